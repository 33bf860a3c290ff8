"""SavedModel directories read as data: protobufs and checkpoint tensors, never run.

- :mod:`.reader`: ``saved_model.pb`` parsed as a protobuf, the serving
  signature, and variables read from ``variables/`` with TensorFlow's
  checkpoint reader, addressed by their node in the SavedModel's object graph.
"""
