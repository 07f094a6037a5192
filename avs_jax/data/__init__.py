"""Input pipelines over the TFRecord shards written by `data_prep.avsbench`.

  ds = train_dataset(data_dir, 'ms3', batch_size=8, image_size=224, seed=0)
  it = iter(ds); batch = next(it); state = it.get_state()

No TensorFlow: records are parsed with protobuf and decoded with PIL. A
prepared dataset that cannot serve a request (another setting, a missing
split or shard, too few clips) raises DataError, one line saying what to do.
"""

from avs_jax.data.pipeline import eval_dataset
from avs_jax.data.pipeline import num_examples
from avs_jax.data.pipeline import train_dataset
from avs_jax.data.records import DataError
from avs_jax.data.records import DatasetNotFoundError
from avs_jax.data.records import IMAGENET_MEAN
from avs_jax.data.records import IMAGENET_STD

__all__ = [
    'train_dataset',
    'eval_dataset',
    'num_examples',
    'DataError',
    'DatasetNotFoundError',
    'IMAGENET_MEAN',
    'IMAGENET_STD',
]
