import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Criterion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CRITERION_UNSPECIFIED: _ClassVar[Criterion]
    CRITERION_BN_SCALE: _ClassVar[Criterion]
    CRITERION_L1: _ClassVar[Criterion]
    CRITERION_L2: _ClassVar[Criterion]
    CRITERION_RANDOM: _ClassVar[Criterion]
    CRITERION_LAMP: _ClassVar[Criterion]
    CRITERION_TAYLOR: _ClassVar[Criterion]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_GLOBAL: _ClassVar[Scope]
    SCOPE_LAYERWISE: _ClassVar[Scope]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_LITERT: _ClassVar[ExportFormat]
    EXPORT_FORMAT_ONNX: _ClassVar[ExportFormat]
CRITERION_UNSPECIFIED: Criterion
CRITERION_BN_SCALE: Criterion
CRITERION_L1: Criterion
CRITERION_L2: Criterion
CRITERION_RANDOM: Criterion
CRITERION_LAMP: Criterion
CRITERION_TAYLOR: Criterion
SCOPE_UNSPECIFIED: Scope
SCOPE_GLOBAL: Scope
SCOPE_LAYERWISE: Scope
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_LITERT: ExportFormat
EXPORT_FORMAT_ONNX: ExportFormat

class PruningSpec(_message.Message):
    __slots__ = ("ratio", "ratios", "criterion", "scope", "round_to", "round_to_auto", "min_channels", "exclude", "reload_weights", "seed", "bias_compensation", "taylor_batches", "iterative_steps", "iterative_schedule", "head_ratio", "targets")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RATIOS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_AUTO_FIELD_NUMBER: _ClassVar[int]
    MIN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    RELOAD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BIAS_COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    TAYLOR_BATCHES_FIELD_NUMBER: _ClassVar[int]
    ITERATIVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    ITERATIVE_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    HEAD_RATIO_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    ratios: _containers.RepeatedScalarFieldContainer[float]
    criterion: Criterion
    scope: Scope
    round_to: int
    round_to_auto: bool
    min_channels: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    reload_weights: bool
    seed: int
    bias_compensation: bool
    taylor_batches: int
    iterative_steps: int
    iterative_schedule: str
    head_ratio: float
    targets: TargetSpec
    def __init__(self, ratio: _Optional[float] = ..., ratios: _Optional[_Iterable[float]] = ..., criterion: _Optional[_Union[Criterion, str]] = ..., scope: _Optional[_Union[Scope, str]] = ..., round_to: _Optional[int] = ..., round_to_auto: _Optional[bool] = ..., min_channels: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., reload_weights: _Optional[bool] = ..., seed: _Optional[int] = ..., bias_compensation: _Optional[bool] = ..., taylor_batches: _Optional[int] = ..., iterative_steps: _Optional[int] = ..., iterative_schedule: _Optional[str] = ..., head_ratio: _Optional[float] = ..., targets: _Optional[_Union[TargetSpec, _Mapping]] = ...) -> None: ...

class TargetSpec(_message.Message):
    __slots__ = ("step_time", "latency", "latency_ms", "latency_batch", "peak_memory", "params", "max_params", "flops", "max_flops", "tolerance", "corrections", "max_group_ratio")
    STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BATCH_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FLOPS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    step_time: float
    latency: float
    latency_ms: float
    latency_batch: int
    peak_memory: float
    params: float
    max_params: int
    flops: float
    max_flops: int
    tolerance: float
    corrections: int
    max_group_ratio: float
    def __init__(self, step_time: _Optional[float] = ..., latency: _Optional[float] = ..., latency_ms: _Optional[float] = ..., latency_batch: _Optional[int] = ..., peak_memory: _Optional[float] = ..., params: _Optional[float] = ..., max_params: _Optional[int] = ..., flops: _Optional[float] = ..., max_flops: _Optional[int] = ..., tolerance: _Optional[float] = ..., corrections: _Optional[int] = ..., max_group_ratio: _Optional[float] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("epochs", "batch_size", "learning_rate", "train_data", "eval_data", "image_key", "label_key", "resize", "measure_steps", "steps_per_execution", "mixed_precision", "cache_mib", "deterministic", "sparsity_epochs", "sparsity_lambda", "distill_alpha", "distill_temperature", "bn_recalibration_batches")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DATA_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_KEY_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    MEASURE_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EXECUTION_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    CACHE_MIB_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    DISTILL_ALPHA_FIELD_NUMBER: _ClassVar[int]
    DISTILL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    BN_RECALIBRATION_BATCHES_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    learning_rate: float
    train_data: str
    eval_data: str
    image_key: str
    label_key: str
    resize: bool
    measure_steps: int
    steps_per_execution: int
    mixed_precision: str
    cache_mib: int
    deterministic: bool
    sparsity_epochs: int
    sparsity_lambda: float
    distill_alpha: float
    distill_temperature: float
    bn_recalibration_batches: int
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., train_data: _Optional[str] = ..., eval_data: _Optional[str] = ..., image_key: _Optional[str] = ..., label_key: _Optional[str] = ..., resize: _Optional[bool] = ..., measure_steps: _Optional[int] = ..., steps_per_execution: _Optional[int] = ..., mixed_precision: _Optional[str] = ..., cache_mib: _Optional[int] = ..., deterministic: _Optional[bool] = ..., sparsity_epochs: _Optional[int] = ..., sparsity_lambda: _Optional[float] = ..., distill_alpha: _Optional[float] = ..., distill_temperature: _Optional[float] = ..., bn_recalibration_batches: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("model_uri", "output_uri", "pruning", "training", "max_accuracy_drop", "version", "max_run_seconds", "exports")
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    output_uri: str
    pruning: PruningSpec
    training: TrainingSpec
    max_accuracy_drop: float
    version: int
    max_run_seconds: float
    exports: _containers.RepeatedScalarFieldContainer[ExportFormat]
    def __init__(self, model_uri: _Optional[str] = ..., output_uri: _Optional[str] = ..., pruning: _Optional[_Union[PruningSpec, _Mapping]] = ..., training: _Optional[_Union[TrainingSpec, _Mapping]] = ..., max_accuracy_drop: _Optional[float] = ..., version: _Optional[int] = ..., max_run_seconds: _Optional[float] = ..., exports: _Optional[_Iterable[_Union[ExportFormat, str]]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "spec", "state", "stage", "progress", "message", "error", "result", "create_time", "start_time", "end_time", "update_time", "request_id", "attempts", "worker", "lease_expire_time", "tenant")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        STATE_QUEUED: _ClassVar[Job.State]
        STATE_RUNNING: _ClassVar[Job.State]
        STATE_SUCCEEDED: _ClassVar[Job.State]
        STATE_FAILED: _ClassVar[Job.State]
        STATE_CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    STATE_QUEUED: Job.State
    STATE_RUNNING: Job.State
    STATE_SUCCEEDED: Job.State
    STATE_FAILED: Job.State
    STATE_CANCELLED: Job.State
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[Job.Stage]
        STAGE_FETCHING: _ClassVar[Job.Stage]
        STAGE_ANALYZING: _ClassVar[Job.Stage]
        STAGE_SCORING: _ClassVar[Job.Stage]
        STAGE_REBUILDING: _ClassVar[Job.Stage]
        STAGE_FINE_TUNING: _ClassVar[Job.Stage]
        STAGE_EVALUATING: _ClassVar[Job.Stage]
        STAGE_MEASURING: _ClassVar[Job.Stage]
        STAGE_EXPORTING: _ClassVar[Job.Stage]
    STAGE_UNSPECIFIED: Job.Stage
    STAGE_FETCHING: Job.Stage
    STAGE_ANALYZING: Job.Stage
    STAGE_SCORING: Job.Stage
    STAGE_REBUILDING: Job.Stage
    STAGE_FINE_TUNING: Job.Stage
    STAGE_EVALUATING: Job.Stage
    STAGE_MEASURING: Job.Stage
    STAGE_EXPORTING: Job.Stage
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: JobSpec
    state: Job.State
    stage: Job.Stage
    progress: float
    message: str
    error: _status_pb2.Status
    result: JobResult
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    request_id: str
    attempts: int
    worker: str
    lease_expire_time: _timestamp_pb2.Timestamp
    tenant: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[Job.State, str]] = ..., stage: _Optional[_Union[Job.Stage, str]] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., attempts: _Optional[int] = ..., worker: _Optional[str] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("params", "weight_bytes", "flops", "peak_memory_bytes", "train_step_seconds", "train_step_p90_seconds", "latency_batch1_seconds", "latency_batch_seconds", "accuracy", "how", "train_step_p10_seconds", "accuracy_ci_low", "accuracy_ci_high", "eval_examples")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEP_P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BATCH1_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BATCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEP_P10_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    params: int
    weight_bytes: int
    flops: int
    peak_memory_bytes: int
    train_step_seconds: float
    train_step_p90_seconds: float
    latency_batch1_seconds: float
    latency_batch_seconds: float
    accuracy: float
    how: _struct_pb2.Struct
    train_step_p10_seconds: float
    accuracy_ci_low: float
    accuracy_ci_high: float
    eval_examples: int
    def __init__(self, params: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., flops: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., train_step_seconds: _Optional[float] = ..., train_step_p90_seconds: _Optional[float] = ..., latency_batch1_seconds: _Optional[float] = ..., latency_batch_seconds: _Optional[float] = ..., accuracy: _Optional[float] = ..., how: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., train_step_p10_seconds: _Optional[float] = ..., accuracy_ci_low: _Optional[float] = ..., accuracy_ci_high: _Optional[float] = ..., eval_examples: _Optional[int] = ...) -> None: ...

class TargetResult(_message.Message):
    __slots__ = ("metric", "wanted", "wanted_absolute", "predicted", "measured", "met", "how", "remeasured")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    WANTED_ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    MET_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    REMEASURED_FIELD_NUMBER: _ClassVar[int]
    metric: str
    wanted: float
    wanted_absolute: bool
    predicted: float
    measured: float
    met: bool
    how: _struct_pb2.Struct
    remeasured: float
    def __init__(self, metric: _Optional[str] = ..., wanted: _Optional[float] = ..., wanted_absolute: _Optional[bool] = ..., predicted: _Optional[float] = ..., measured: _Optional[float] = ..., met: _Optional[bool] = ..., how: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., remeasured: _Optional[float] = ...) -> None: ...

class ExportedArtifact(_message.Message):
    __slots__ = ("format", "file", "size_bytes", "samples", "max_abs_diff", "how")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    format: ExportFormat
    file: str
    size_bytes: int
    samples: int
    max_abs_diff: float
    how: _struct_pb2.Struct
    def __init__(self, format: _Optional[_Union[ExportFormat, str]] = ..., file: _Optional[str] = ..., size_bytes: _Optional[int] = ..., samples: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., how: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("ratio", "metrics", "accuracy_drop", "plan")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    metrics: Metrics
    accuracy_drop: float
    plan: _struct_pb2.Struct
    def __init__(self, ratio: _Optional[float] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., accuracy_drop: _Optional[float] = ..., plan: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("outcome", "max_accuracy_drop", "best_ratio", "best_accuracy_drop", "output_uri", "original", "pruned", "plan", "candidates", "selected_ratio", "decision", "targets", "exports", "resumed", "resumed_from")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[JobResult.Outcome]
        OUTCOME_PUBLISHED: _ClassVar[JobResult.Outcome]
        OUTCOME_GATE_FAILED: _ClassVar[JobResult.Outcome]
        OUTCOME_CURVES_ONLY: _ClassVar[JobResult.Outcome]
    OUTCOME_UNSPECIFIED: JobResult.Outcome
    OUTCOME_PUBLISHED: JobResult.Outcome
    OUTCOME_GATE_FAILED: JobResult.Outcome
    OUTCOME_CURVES_ONLY: JobResult.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    BEST_RATIO_FIELD_NUMBER: _ClassVar[int]
    BEST_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SELECTED_RATIO_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    outcome: JobResult.Outcome
    max_accuracy_drop: float
    best_ratio: float
    best_accuracy_drop: float
    output_uri: str
    original: Metrics
    pruned: Metrics
    plan: _struct_pb2.Struct
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    selected_ratio: float
    decision: str
    targets: _containers.RepeatedCompositeFieldContainer[TargetResult]
    exports: _containers.RepeatedCompositeFieldContainer[ExportedArtifact]
    resumed: int
    resumed_from: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, outcome: _Optional[_Union[JobResult.Outcome, str]] = ..., max_accuracy_drop: _Optional[float] = ..., best_ratio: _Optional[float] = ..., best_accuracy_drop: _Optional[float] = ..., output_uri: _Optional[str] = ..., original: _Optional[_Union[Metrics, _Mapping]] = ..., pruned: _Optional[_Union[Metrics, _Mapping]] = ..., plan: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., selected_ratio: _Optional[float] = ..., decision: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[TargetResult, _Mapping]]] = ..., exports: _Optional[_Iterable[_Union[ExportedArtifact, _Mapping]]] = ..., resumed: _Optional[int] = ..., resumed_from: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "request_id", "validate_only")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    request_id: str
    validate_only: bool
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: Job.State
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PlanPruningRequest(_message.Message):
    __slots__ = ("model_uri", "pruning")
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    pruning: PruningSpec
    def __init__(self, model_uri: _Optional[str] = ..., pruning: _Optional[_Union[PruningSpec, _Mapping]] = ...) -> None: ...

class ChannelGroup(_message.Message):
    __slots__ = ("id", "origins", "size_before", "size_after", "criterion", "frozen_reasons", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SIZE_AFTER_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    FROZEN_REASONS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: int
    origins: _containers.RepeatedScalarFieldContainer[str]
    size_before: int
    size_after: int
    criterion: str
    frozen_reasons: _containers.RepeatedScalarFieldContainer[str]
    kind: str
    def __init__(self, id: _Optional[int] = ..., origins: _Optional[_Iterable[str]] = ..., size_before: _Optional[int] = ..., size_after: _Optional[int] = ..., criterion: _Optional[str] = ..., frozen_reasons: _Optional[_Iterable[str]] = ..., kind: _Optional[str] = ...) -> None: ...

class PlanPruningResponse(_message.Message):
    __slots__ = ("plan", "groups", "params_before", "params_after", "flops_before", "flops_after")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_AFTER_FIELD_NUMBER: _ClassVar[int]
    FLOPS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FLOPS_AFTER_FIELD_NUMBER: _ClassVar[int]
    plan: _struct_pb2.Struct
    groups: _containers.RepeatedCompositeFieldContainer[ChannelGroup]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    def __init__(self, plan: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[ChannelGroup, _Mapping]]] = ..., params_before: _Optional[int] = ..., params_after: _Optional[int] = ..., flops_before: _Optional[int] = ..., flops_after: _Optional[int] = ...) -> None: ...
