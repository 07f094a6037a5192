"""`tf.train.Example` parsing without TensorFlow.

The message classes are built at run time from the public schema of
`tensorflow/core/example/{example,feature}.proto` (same field numbers, so the
same wire format) under another package name, so they never clash with
TensorFlow's own. The input pipeline's worker processes thus need neither
TensorFlow's import time (~5 s) nor its memory (~0.5 GB), and cannot touch an
accelerator.
"""

import functools

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory

_PACKAGE = 'avs_jax.tf_example'
_F = descriptor_pb2.FieldDescriptorProto


def _field(
    name,
    number,
    type_,
    label=_F.LABEL_OPTIONAL,
    type_name=None,
    oneof_index=None,
):
  field = _F(name=name, number=number, type=type_, label=label)
  if type_name:
    field.type_name = f'.{_PACKAGE}.{type_name}'
  if oneof_index is not None:
    field.oneof_index = oneof_index
  return field


@functools.cache
def example_class():
  """The `Example` message class (parse with `Example.FromString(raw)`)."""
  file = descriptor_pb2.FileDescriptorProto(
      name='avs_jax/tf_example.proto', package=_PACKAGE, syntax='proto3'
  )
  rep = _F.LABEL_REPEATED
  for name, type_ in (
      ('BytesList', _F.TYPE_BYTES),
      ('FloatList', _F.TYPE_FLOAT),
      ('Int64List', _F.TYPE_INT64),
  ):
    file.message_type.add(name=name).field.append(
        _field('value', 1, type_, rep)
    )
  feature = file.message_type.add(name='Feature')
  feature.oneof_decl.add(name='kind')
  for number, name in enumerate(('bytes_list', 'float_list', 'int64_list'), 1):
    type_name = ''.join(w.capitalize() for w in name.split('_'))
    feature.field.append(
        _field(
            name, number, _F.TYPE_MESSAGE, type_name=type_name, oneof_index=0
        )
    )
  features = file.message_type.add(name='Features')
  entry = features.nested_type.add(name='FeatureEntry')
  entry.options.map_entry = True
  entry.field.append(_field('key', 1, _F.TYPE_STRING))
  entry.field.append(_field('value', 2, _F.TYPE_MESSAGE, type_name='Feature'))
  features.field.append(
      _field(
          'feature', 1, _F.TYPE_MESSAGE, rep, type_name='Features.FeatureEntry'
      )
  )
  file.message_type.add(name='Example').field.append(
      _field('features', 1, _F.TYPE_MESSAGE, type_name='Features')
  )
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName(f'{_PACKAGE}.Example')
  )


def parse(raw):
  """Serialized `tf.train.Example` -> {key: list of bytes, floats or ints}."""
  out = {}
  for key, feature in example_class().FromString(raw).features.feature.items():
    kind = feature.WhichOneof('kind')
    out[key] = list(getattr(feature, kind).value) if kind else []
  return out
