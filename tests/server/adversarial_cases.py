"""The bad-input matrix of test_adversarial.py: one row per hostile request.

A row names the RPC, how the request differs from a good one (dotted field
paths into the request message, values or callables of the environment), the
status codes the service may answer with (the first is the one we expect; a
few rows accept a second reasonable one) and the field a BadRequest violation
must name. ``raw:<Method>`` rows send the bytes as they are.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

C = grpc.StatusCode
IA, NF, PD, FP = C.INVALID_ARGUMENT, C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION
NAN, INF = float("nan"), float("inf")
I32 = 2**31 - 1
HUGE = "a" * 100_000  # far above any sane bound, like the 100 KB output_uri of issue 8
BIG = "b" * 12_000  # between 8 and 16 KB: where echoed values broke gRPC metadata
EMOJI = "\U0001f600" * 30_000  # 120 KB of 4-byte UTF-8


@dataclass(frozen=True)
class Case:
    id: str
    rpc: str  # CreateJob, GetJob, ListJobs, CancelJob, WatchJob, PlanPruning or raw:<Method>
    request: dict[str, Any] | bytes
    codes: tuple[grpc.StatusCode, ...]
    field: str | None = None  # BadRequest field violation expected (exact or a prefix of [i])
    worker: bool = False  # runs a worker subprocess (longer deadline)
    creates: bool = False  # a job is meant to be created (the row's `then` cleans up)
    names_uri: str | None = None  # the message must name this request field's value (basename)
    then: Callable[[Any, Any], list[str]] | None = None  # extra checks on (env, result)


def _in(sub: str) -> Callable[[Any], str]:
    """A path under the allowed tree, resolved with the environment."""
    return lambda e: os.path.join(e.allowed, sub)


def _out(sub: str) -> Callable[[Any], str]:
    return lambda e: os.path.join(e.outside, sub)


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode()


def _flip_first(e: Any) -> str:
    token = e.real_token()
    return ("B" if token[0] == "A" else "A") + token[1:]


def _create(
    cid: str, changes: dict[str, Any], codes: Any, field: str | None = None, **kw: Any
) -> Case:
    return Case(
        cid, "CreateJob", changes, codes if isinstance(codes, tuple) else (codes,), field, **kw
    )


def _numbers() -> list[Case]:
    r, t = "spec.pruning.", "spec.training."
    rows = [
        ("ratio-nan", r + "ratio", NAN), ("ratio-inf", r + "ratio", INF),
        ("ratio-neg-inf", r + "ratio", -INF), ("ratio-negative", r + "ratio", -0.1),
        ("ratio-one", r + "ratio", 1.0), ("ratio-above-one", r + "ratio", 1.5),
        ("ratios-nan", r + "ratios", [0.3, NAN]), ("ratios-inf", r + "ratios", [INF]),
        ("ratios-negative", r + "ratios", [0.2, -0.5]),
        ("ratios-too-long", r + "ratios", [0.01 * (i % 99) for i in range(10_000)]),
        ("lr-inf", t + "learning_rate", INF), ("lr-nan", t + "learning_rate", NAN),
        ("lr-negative", t + "learning_rate", -0.01),
        ("epochs-negative", t + "epochs", -1), ("epochs-absurd", t + "epochs", I32),
        ("batch-negative", t + "batch_size", -5), ("batch-absurd", t + "batch_size", I32),
        ("measure-steps-negative", t + "measure_steps", -1),
        ("measure-steps-absurd", t + "measure_steps", I32),
        ("round-to-negative", r + "round_to", -8),
        ("min-channels-negative", r + "min_channels", -1),
        ("criterion-unknown", r + "criterion", 99), ("criterion-negative", r + "criterion", -1),
        ("scope-unknown", r + "scope", 7), ("version-negative", "spec.version", -1),
        ("drop-nan", "spec.max_accuracy_drop", NAN), ("drop-inf", "spec.max_accuracy_drop", INF),
        ("drop-negative", "spec.max_accuracy_drop", -0.02),
        ("drop-above-one", "spec.max_accuracy_drop", 1.5),
    ]  # fmt: skip
    cases = [_create("create-" + cid, {path: v}, IA, path) for cid, path, v in rows]
    cases.append(
        _create(
            "create-drop-without-eval",
            {"spec.max_accuracy_drop": 0.02, "spec.training.eval_data": ""},
            IA,
            "spec.training.eval_data",
        )
    )
    return cases


def _sizes() -> list[Case]:
    rows = [
        ("model-uri", "spec.model_uri", lambda e: os.path.join(e.allowed, HUGE)),
        ("output-uri", "spec.output_uri", lambda e: os.path.join(e.allowed, HUGE)),
        ("model-uri-12k", "spec.model_uri", lambda e: os.path.join(e.allowed, BIG)),
        ("model-uri-emoji", "spec.model_uri", lambda e: os.path.join(e.allowed, EMOJI)),
        ("request-id", "request_id", HUGE),
        ("exclude-entry", "spec.pruning.exclude", ["conv", HUGE]),
        ("exclude-count", "spec.pruning.exclude", ["c"] * 100_000),
        ("train-data", "spec.training.train_data", lambda e: os.path.join(e.allowed, HUGE)),
        ("eval-data", "spec.training.eval_data", lambda e: os.path.join(e.allowed, HUGE)),
        ("image-key", "spec.training.image_key", HUGE),
        ("label-key", "spec.training.label_key", HUGE),
    ]
    field = {"request-id": "request_id"}
    return [
        _create(f"create-huge-{cid}", {path: v}, IA, field.get(cid, path)) for cid, path, v in rows
    ]


def _uris() -> list[Case]:
    m, o, td, ed = (
        "spec.model_uri",
        "spec.output_uri",
        "spec.training.train_data",
        "spec.training.eval_data",
    )
    sm, ratio = _in("models/sm"), "spec.pruning.ratio"
    pct = lambda e: "file://" + e.allowed + "/%2e%2e/outside/model.keras"  # noqa: E731
    inside_sm = lambda e: "file://" + e.allowed + "/models/./sm/nested/"  # noqa: E731
    return [
        _create("create-empty-spec", {"spec": None}, IA, "spec.model_uri"),
        _create("create-empty-model-uri", {m: ""}, IA, m),
        _create("create-blank-model-uri", {m: "   "}, IA, m),
        _create("create-empty-output-uri", {o: ""}, IA, o),
        _create("create-model-traversal", {m: _in("../outside/model.keras")}, PD),
        _create("create-model-pct-traversal", {m: pct}, PD),
        _create("create-model-symlink-out", {m: _in("escape/model.keras")}, PD),
        _create("create-output-symlink-out", {o: _in("outlink")}, PD),
        _create("create-model-outside", {m: "/etc/hostname"}, PD),
        _create("create-output-outside", {o: _out("out")}, PD),
        _create("create-model-file-outside", {m: "file:///etc/hostname"}, PD),
        _create("create-model-gs-outside", {m: "gs://some-bucket/m.keras"}, PD),
        _create("create-model-http", {m: "http://127.0.0.1:1/m.keras"}, IA, m),
        _create("create-model-s3", {m: "s3://bucket/m.keras"}, IA, m),
        _create("create-output-ftp", {o: "ftp://host/out"}, IA, o),
        _create("create-model-file-host", {m: lambda e: "file://evil.example" + e.model}, IA, m),
        _create("create-model-nul", {m: _in("models/tiny.keras\x00.png")}, IA, m),
        _create("create-output-nul", {o: _in("out\x00x")}, IA, o),
        _create("create-model-control-chars", {m: _in("models/m\r\x1b[2Kx.keras")}, (IA, NF)),
        _create("create-model-bidi-unicode", {m: _in("models/\u202esarek.ynit")}, (NF, IA)),
        _create("create-model-missing", {m: _in("models/nope.keras")}, NF),
        _create("create-output-equals-model", {o: lambda e: e.model}, IA, o),
        _create("create-output-under-model-file", {o: lambda e: e.model + "/out"}, IA, o),
        _create("create-output-equals-savedmodel", {m: sm, o: sm}, IA, o),
        _create("create-output-in-savedmodel", {m: sm, o: _in("models/sm/n")}, IA, o),
        _create("create-output-in-savedmodel-respelled", {m: sm, o: inside_sm}, IA, o),
        _create("create-train-data-no-match", {td: _in("data/none-*.tfrecord")}, NF),
        _create("create-train-data-outside", {td: _out("*.tfrecord")}, PD),
        _create("create-eval-data-traversal", {ed: _in("../outside/eval.tfrecord")}, PD),
        _create("create-train-data-http", {td: "http://h/x.tfrecord"}, IA, td),
        _create("create-version-taken", {o: _in("taken"), "spec.version": 1}, C.ALREADY_EXISTS),
        _create("create-validate-only-bad", {"validate_only": True, ratio: 2.0}, IA, ratio),
    ]  # fmt: skip


def _names() -> list[Case]:
    rows = []
    for rpc in ("GetJob", "CancelJob", "WatchJob"):
        low = rpc[:-3].lower()
        rows += [
            Case(f"{low}-missing", rpc, {"name": "jobs/0123456789abcdef"}, (NF,)),
            Case(f"{low}-jobs-slash", rpc, {"name": "jobs/"}, (IA,), "name"),
            Case(f"{low}-huge-name", rpc, {"name": "jobs/" + HUGE}, (IA,), "name"),
        ]
    rows += [
        Case("get-empty-name", "GetJob", {"name": ""}, (IA,), "name"),
        Case("get-nested-name", "GetJob", {"name": "jobs/a/b"}, (IA,), "name"),
        Case("get-no-prefix", "GetJob", {"name": "x"}, (IA,), "name"),
        Case("get-wrong-collection", "GetJob", {"name": "models/abc"}, (IA,), "name"),
        Case("get-12k-name", "GetJob", {"name": "jobs/" + BIG}, (IA,), "name"),
        Case("get-nul-in-id", "GetJob", {"name": "jobs/ab\x00cd"}, (IA, NF)),
        Case("get-dotdot-id", "GetJob", {"name": "jobs/.."}, (IA, NF)),
        Case("cancel-no-prefix", "CancelJob", {"name": "x"}, (IA,), "name"),
        Case("watch-no-prefix", "WatchJob", {"name": "x"}, (IA,), "name"),
    ]
    return rows


def _lists() -> list[Case]:
    tok = "page_token"
    L = "ListJobs"
    return [
        Case("list-page-size-negative", L, {"page_size": -1}, (IA,), "page_size"),
        Case("list-page-size-min-int", L, {"page_size": -(2**31)}, (IA,), "page_size"),
        Case("list-state-unknown", L, {"state": 99}, (IA,), "state"),
        Case("list-state-negative", L, {"state": -1}, (IA,), "state"),
        Case("list-token-garbage", L, {tok: "not a token!!"}, (IA,), tok),
        Case("list-token-forged-negative", L, {tok: _b64("-3")}, (IA,), tok),
        Case("list-token-forged-offset", L, {tok: _b64("1")}, (IA,), tok),
        Case("list-token-forged-json", L, {tok: _b64('{"offset": 1}')}, (IA,), tok),
        Case("list-token-huge", L, {tok: HUGE}, (IA,), tok),
        Case("list-token-12k", L, {tok: BIG}, (IA,), tok),
        Case("list-token-b64-junk", L, {tok: _b64(bytes(range(256)) * 2)}, (IA,), tok),
        Case("list-token-nul", L, {tok: "\x00\x00"}, (IA,), tok),
        Case("list-token-tampered", L, {tok: _flip_first}, (IA,), tok),
        Case("list-token-extended", L, {tok: lambda e: e.real_token() + "AAAA"}, (IA,), tok),
    ]


def _plans() -> list[Case]:
    P, m, p = "PlanPruning", "model_uri", "pruning."
    bad_model = (IA, FP)
    return [
        Case("plan-empty-model", P, {m: ""}, (IA,), m),
        Case("plan-huge-model", P, {m: lambda e: os.path.join(e.allowed, HUGE)}, (IA,), m),
        Case("plan-ratio-nan", P, {p + "ratio": NAN}, (IA,), p + "ratio"),
        Case("plan-ratio-above-one", P, {p + "ratio": 1.0}, (IA,), p + "ratio"),
        Case("plan-criterion-unknown", P, {p + "criterion": 42}, (IA,), p + "criterion"),
        Case("plan-huge-exclude", P, {p + "exclude": [HUGE]}, (IA,), p + "exclude"),
        Case("plan-model-outside", P, {m: "/etc/passwd"}, (PD,)),
        Case("plan-model-s3", P, {m: "s3://b/m.keras"}, (IA,), m),
        Case("plan-model-missing", P, {m: _in("models/missing.keras")}, (NF,), worker=True),
        Case("plan-random-bytes-keras", P, {m: _in("models/junk.keras")}, bad_model,
             worker=True, names_uri=m),
        Case("plan-empty-h5", P, {m: _in("models/empty.h5")}, bad_model, worker=True, names_uri=m),
        Case("plan-dir-without-savedmodel", P, {m: _in("models/nosm")}, (*bad_model, NF),
             worker=True, names_uri=m),
        Case("plan-junk-savedmodel-pb", P, {m: _in("models/sm")}, bad_model, worker=True,
             names_uri=m),
    ]  # fmt: skip


# Malformed protobuf bytes for every unary RPC and WatchJob.
RAW = [
    ("raw-create-truncated-field", "CreateJob", b"\x0a\x40\x0a\x05abc"),
    ("raw-create-endless-varint", "CreateJob", b"\x18" + b"\xff" * 12),
    ("raw-create-unterminated-group", "CreateJob", b"\x0b\x08\x01"),
    ("raw-get-invalid-utf8", "GetJob", b"\x0a\x04jobs\xc3\x28"),
    ("raw-list-truncated-varint", "ListJobs", b"\x08\x80"),
    ("raw-cancel-bad-wire-type", "CancelJob", b"\x0f\x01"),
    ("raw-watch-overlong-length", "WatchJob", b"\x0a\x10abc"),
    ("raw-plan-truncated-double", "PlanPruning", b"\x12\x03\x09\x00\x00"),
    ("raw-plan-field-zero", "PlanPruning", b"\x00\x01"),
]


def cases() -> list[Case]:
    raw = [Case(cid, "raw:" + rpc, data, (IA,)) for cid, rpc, data in RAW]
    return _numbers() + _sizes() + _uris() + _names() + _lists() + _plans() + raw
