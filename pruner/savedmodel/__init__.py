"""SavedModel directories read as data: protobufs and checkpoint tensors, never run.

- :mod:`.reader`: ``saved_model.pb`` parsed as a protobuf, the serving
  signature, and variables read from ``variables/`` with TensorFlow's
  checkpoint reader, addressed by their node in the SavedModel's object graph.
- :mod:`.keras2`: tf.keras / Keras 2 SavedModels rebuilt from ``keras_metadata.pb``'s
  config and the checkpoint's weights, matched to the layers through the object
  graph; other objects in the file are ignored and noted.
- :mod:`.graph_import`: SavedModels without Keras metadata (``model.export``,
  ``tf.saved_model.save``, TF-Hub style) rebuilt as Keras functional models:
  :mod:`.graph_inline` flattens the signature's functions, :mod:`.graph_fold`
  folds constants in numpy, :mod:`.graph_patterns` merges BatchNorm, bias,
  swish and dilation patterns, :mod:`.graph_ops` maps ops to Keras layers.
"""
