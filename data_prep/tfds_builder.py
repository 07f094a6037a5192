"""TFDS builder `avs_bench` (configs `s4`, `ms3`, `avss`) of a manual AVSBench copy.

`python -m data_prep.avsbench` writes the same dataset in parallel, resumably
and with an error report; this builder also lets `tfds build` do it and gives
`tfds.load('avs_bench/ms3', data_dir=OUT)` the feature specification.
"""

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from avs_jax.data import records
from data_prep import avss
from data_prep import layout

_DESCRIPTION = """\
AVSBench-object (Zhou et al., "Audio-Visual Segmentation", ECCV 2022): 5 s
clips, 5 frames (one per second), the binary masks of the sounding objects
and the audio as VGGish log-mel examples (one 0.96 s example per frame).
S4 (Single-source): one sounding object per clip; the training split labels
only the first frame. MS3 (Multi-sources): several sounding objects, all
frames labelled. Masks are 0/1; `labelled[i]` says whether mask i is ground
truth (an unlabelled mask is all zeros).
"""

_CITATION = """\
@inproceedings{zhou2022avs,
  title={Audio-Visual Segmentation},
  author={Zhou, Jinxing and Wang, Jianyuan and Zhang, Jiayi and Sun, Weixuan
          and Zhang, Jing and Birchfield, Stan and Guo, Dan and Kong, Lingpeng
          and Wang, Meng and Zhong, Yiran},
  booktitle={ECCV},
  year={2022}
}
"""


def features(setting='s4'):
  """The feature specification of one clip of `setting`.

  AVSS (AVSBench-semantic): 10 frames (black where a 5-frame clip is
  padded), `masks` holding class indices (0 = background), `labelled` the
  annotated frames, and `frame_mask` the real (not padded) frames; the
  category is the subset (v1s, v1m, v2).
  """
  f = tfds.features
  n = records.AVSS_FRAMES if setting == 'avss' else records.NUM_FRAMES
  spec = {
      'id': f.Text(),
      'category': f.Text(),
      'frames': f.Sequence(
          f.Image(shape=(None, None, 3), encoding_format='png'), length=n
      ),
      'masks': f.Sequence(
          f.Image(shape=(None, None, 1), encoding_format='png'), length=n
      ),
      'labelled': f.Tensor(shape=(n,), dtype=np.bool_),
      'log_mel': f.Tensor(
          shape=(n, 96, 64), dtype=np.float32, encoding=f.Encoding.BYTES
      ),
  }
  if setting == 'avss':
    spec['frame_mask'] = f.Tensor(shape=(n,), dtype=np.bool_)
  return f.FeaturesDict(spec)


class AvsBench(tfds.core.GeneratorBasedBuilder):
  """AVSBench-object, S4 and MS3 settings."""

  VERSION = tfds.core.Version(records.VERSION)
  RELEASE_NOTES = {
      str(VERSION): 'Frames, masks, labelled flags, VGGish log-mel.'
  }
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='s4', description='Single-source (S4).'),
      tfds.core.BuilderConfig(name='ms3', description='Multi-sources (MS3).'),
      tfds.core.BuilderConfig(
          name='avss', description='AVSBench-semantic (AVSS), 71 classes.'
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  AVSBench is distributed by its authors on request
  (https://opennlplab.github.io/AVSBench/). Put the AVSBench-object folder,
  holding `Single-source/` and `Multi-sources/` with their CSV files, in
  `manual_dir` (or run `python -m data_prep.avsbench --root DIR`). Only the
  frames, masks and wav files are read.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's default looks the module up with `importlib_resources`, which
    # etils only has with its `epath` extra; this file is the answer anyway.
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=features(self.builder_config.name),
        homepage='https://opennlplab.github.io/AVSBench/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root, setting = str(dl_manager.manual_dir), self.builder_config.name
    clips, problems = (
        avss.read_clips(root)
        if setting == 'avss'
        else layout.read_clips(root, setting)
    )
    for p in problems:  # `data_prep.avsbench` reports these.
      logging.warning('skipping %s: %s', p['file'], p['reason'])
    return {
        split: self._generate_examples([c for c in clips if c.split == split])
        for split in records.SPLITS
        if any(c.split == split for c in clips)
    }

  def _generate_examples(self, clips):
    for clip in clips:
      try:
        yield clip.id, (
            avss.load_example(clip)
            if isinstance(clip, avss.Clip)
            else layout.load_clip(clip)
        )
      except layout.ClipError as e:  # `data_prep.avsbench` reports these.
        logging.warning('skipping clip %s: %s', clip.id, e)
