"""AVSegFormer (Gao et al., AAAI 2024): audio queries + deformable transformer.

Reference: vvvb-github/AVSegFormer (`model/AVSegFormer.py`,
`model/head/AVSegHead.py`, `model/utils/*`, `ops/modules/ms_deform_attn.py`).
Every frame is segmented on its own with its own second of audio:

  backbone (ResNet-50 / PVT-v2) -> 4 maps -> 1x1 conv + GroupNorm to 256-d
  audio [128] -> `audio_proj` -> 256-d, the key of the query generator
  query generator (6 x self-attn, cross-attn to the audio, FFN) + learnable
  queries -> 300 queries
  deformable encoder (6 layers, levels 1-3, sine positions + level embedding)
  decoder (6 layers, self-attn, cross-attn to the encoder memory, FFN)
  mask feature: lateral(level 0) + up(memory of level 1) -> conv3x3 + GN +
  ReLU -> cross-modal mixer (channel attention from the audio)
  logits: fc(mask_feature + MLP(queries . mask_feature)), 4x upsampled.

Module names mirror the reference so that its checkpoints convert by name
(`avs_jax.projects.avsegformer.convert`). Layout NHWC, clips `[B, T, H, W, 3]` with
audio embeddings `[B, T, 128]` (VGGish outputs), as `AVSModel`.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avs_jax.models import pvt
from avs_jax.models import resnet
from avs_jax.projects.avsegformer.deform_attn import MSDeformAttn
from avs_jax.models.layers import Dtype, conv, resize_bilinear

XAVIER = nn.initializers.xavier_uniform()


def _dense(features, dtype, name, use_bias=True):
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=XAVIER,
      name=name,
  )


def _layer_norm(dtype, name):
  return nn.LayerNorm(
      epsilon=1e-5,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _group_norm(dtype, name):
  return nn.GroupNorm(
      num_groups=32,
      epsilon=1e-5,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _conv(features, kernel, dtype, name, use_bias=True):
  return conv(
      features,
      kernel,
      1,
      kernel // 2,
      use_bias=use_bias,
      dtype=dtype,
      name=name,
      kernel_init=XAVIER,
  )


def _f32(x):
  """At least float32 (bf16 -> f32; f64 stays f64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _gelu(x):
  return nn.gelu(x, approximate=False)


def sine_position_encoding(h, w, num_feats=128, temperature=10000):
  """The reference `SinePositionalEncoding(normalize=False)`, no padding.

  Returns `[h, w, 2 * num_feats]` (y features, then x), float32.
  """
  y = np.arange(1, h + 1, dtype=np.float32)[:, None] * np.ones(
      (1, w), np.float32
  )
  x = np.ones((h, 1), np.float32) * np.arange(1, w + 1, dtype=np.float32)
  dim_t = np.arange(num_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(num_feats))

  def embed(v):
    v = v[:, :, None] / dim_t
    return np.stack([np.sin(v[:, :, 0::2]), np.cos(v[:, :, 1::2])], -1).reshape(
        h, w, -1
    )

  return np.concatenate([embed(y), embed(x)], -1).astype(np.float32)


def reference_points(spatial_shapes):
  """Pixel centres of every level, `[S, 2]` (x, y) in (0, 1)."""
  pts = []
  for h, w in spatial_shapes:
    ys = np.linspace(0.5, h - 0.5, h, dtype=np.float32) / np.float32(h)
    xs = np.linspace(0.5, w - 0.5, w, dtype=np.float32) / np.float32(w)
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    pts.append(np.stack([xx.reshape(-1), yy.reshape(-1)], -1))
  return np.concatenate(pts, 0)


class MultiheadAttention(nn.Module):
  """`torch.nn.MultiheadAttention(batch_first=True)` with its packed
  `in_proj_weight [3C, C]` (and `in_proj_bias`) and `out_proj`."""

  dim: int = 256
  num_heads: int = 8
  use_bias: bool = True
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):
    c, m = self.dim, self.num_heads
    w = self.param('in_proj_weight', XAVIER, (3 * c, c), jnp.float32)
    w = w.astype(self.dtype)
    if self.use_bias:
      b = self.param(
          'in_proj_bias', nn.initializers.zeros, (3 * c,), jnp.float32
      ).astype(self.dtype)
    else:
      b = jnp.zeros((3 * c,), self.dtype)
    proj = lambda x, i: (
        jnp.einsum(
            '...i,oi->...o', x.astype(self.dtype), w[i * c : (i + 1) * c]
        )
        + b[i * c : (i + 1) * c]
    )
    split = lambda x: x.reshape(x.shape[:-1] + (m, c // m))
    q, k, v = split(proj(q, 0)), split(proj(k, 1)), split(proj(v, 2))
    q = q * (1.0 / math.sqrt(c // m))
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k)
    attn = jax.nn.softmax(_f32(logits), -1).astype(self.dtype)
    attn = nn.Dropout(self.dropout)(attn, deterministic=self.deterministic)
    out = jnp.einsum('nhqk,nkhd->nqhd', attn, v)
    out = out.reshape(out.shape[:2] + (c,))
    return nn.Dense(
        c,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name='out_proj',
    )(out)


class AttentionLayer(nn.Module):
  """Query generator layer: self-attn, cross-attn to the audio, FFN (post-norm)."""

  dim: int = 256
  num_heads: int = 8
  hidden_dim: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, audio):
    attn = lambda name: MultiheadAttention(
        self.dim, self.num_heads, False, dtype=self.dtype, name=name
    )
    query = _layer_norm(self.dtype, 'norm1')(
        query + attn('self_attn')(query, query, query)
    )
    query = _layer_norm(self.dtype, 'norm2')(
        query + attn('cross_attn')(query, audio, audio)
    )
    y = _dense(self.hidden_dim, self.dtype, 'ffn_0')(query)
    y = _dense(self.dim, self.dtype, 'ffn_2')(_gelu(y))
    return _layer_norm(self.dtype, 'norm3')(query + y)


class AttentionGenerator(nn.Module):
  """Audio-conditioned queries: `audio [N, 1, C]` -> `[N, Q, C]`."""

  num_layers: int = 6
  query_num: int = 300
  dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio):
    query = nn.Embed(
        self.query_num,
        self.dim,
        embedding_init=XAVIER,
        param_dtype=jnp.float32,
        name='query',
    ).embedding
    query = jnp.broadcast_to(
        query.astype(self.dtype)[None], (audio.shape[0],) + query.shape
    )
    for i in range(self.num_layers):
      query = AttentionLayer(self.dim, dtype=self.dtype, name=f'layers_{i}')(
          query, audio
      )
    return query


class EncoderLayer(nn.Module):
  """Deformable self-attention over all levels + FFN (post-norm)."""

  dim: int = 256
  ffn_dim: int = 2048
  dropout: float = 0.1
  num_levels: int = 3
  num_heads: int = 8
  num_points: int = 4
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, src, pos, ref, spatial_shapes):
    drop = lambda x: nn.Dropout(self.dropout)(x, self.deterministic)
    y = MSDeformAttn(
        self.dim,
        self.num_levels,
        self.num_heads,
        self.num_points,
        self.dtype,
        name='self_attn',
    )(src + pos, ref, src, spatial_shapes)
    src = _layer_norm(self.dtype, 'norm1')(src + drop(y))
    y = _gelu(_dense(self.ffn_dim, self.dtype, 'linear1')(src))
    y = _dense(self.dim, self.dtype, 'linear2')(drop(y))
    return _layer_norm(self.dtype, 'norm2')(src + drop(y))


class DecoderLayer(nn.Module):
  """Self-attn, cross-attn to the memory, FFN (post-norm, dropout)."""

  dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, memory):
    drop = lambda x: nn.Dropout(self.dropout)(x, self.deterministic)
    attn = lambda name: MultiheadAttention(
        self.dim,
        self.num_heads,
        True,
        self.dropout,
        self.deterministic,
        self.dtype,
        name=name,
    )
    query = _layer_norm(self.dtype, 'norm1')(
        query + drop(attn('self_attn')(query, query, query))
    )
    query = _layer_norm(self.dtype, 'norm2')(
        query + drop(attn('cross_attn')(query, memory, memory))
    )
    y = _gelu(_dense(self.ffn_dim, self.dtype, 'linear1')(query))
    y = _dense(self.dim, self.dtype, 'linear2')(drop(y))
    return _layer_norm(self.dtype, 'norm3')(query + drop(y))


class Encoder(nn.Module):
  num_layers: int = 6
  layer: dict = None
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, src, pos, ref, spatial_shapes):
    for i in range(self.num_layers):
      src = EncoderLayer(
          **(self.layer or {}),
          num_levels=len(spatial_shapes),
          deterministic=self.deterministic,
          dtype=self.dtype,
          name=f'layers_{i}',
      )(src, pos, ref, spatial_shapes)
    return src


class Decoder(nn.Module):
  num_layers: int = 6
  layer: dict = None
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, memory):
    for i in range(self.num_layers):
      query = DecoderLayer(
          **(self.layer or {}),
          deterministic=self.deterministic,
          dtype=self.dtype,
          name=f'layers_{i}',
      )(query, memory)
    return query


class Transformer(nn.Module):
  """`AVSTransformer`: deformable encoder, then the query decoder."""

  num_layers: int = 6
  layer: dict = None
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, src, pos, spatial_shapes):
    ref = jnp.asarray(reference_points(spatial_shapes))
    ref = jnp.broadcast_to(
        ref[None, :, None, :], (1, ref.shape[0], len(spatial_shapes), 2)
    )
    memory = Encoder(
        self.num_layers,
        self.layer,
        self.deterministic,
        self.dtype,
        name='encoder',
    )(src, pos, ref, spatial_shapes)
    out = Decoder(
        self.num_layers,
        self.layer,
        self.deterministic,
        self.dtype,
        name='decoder',
    )(query, memory)
    return memory, out


class CrossModalMixer(nn.Module):
  """Channel attention of the audio over the map: `map * sigmoid(attn)`.

  `feature_map [N, h, w, C]`, `audio [N, 1, C]` -> `[N, h, w, C]`.
  """

  dim: int = 256
  num_heads: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map, audio):
    n, h, w, c = feature_map.shape
    m = self.num_heads
    flat = feature_map.reshape(n, h * w, c)
    q = _dense(c, self.dtype, 'q_proj', use_bias=False)(audio)
    q = q.reshape(n, 1, m, c // m)
    kv = _dense(2 * c, self.dtype, 'kv_proj', use_bias=False)(flat)
    kv = kv.reshape(n, h * w, 2, m, c // m)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k) * (c // m) ** -0.5
    attn = jax.nn.softmax(_f32(logits), -1).astype(self.dtype)
    x = jnp.einsum('nhqk,nkhd->nqhd', attn, v).reshape(n, 1, c)
    x = jax.nn.sigmoid(_dense(c, self.dtype, 'proj')(x))
    return feature_map * x[:, :, None, :]


class MLP(nn.Module):
  """1x1 convs with ReLU between: `[N, h, w, Q]` -> `[N, h, w, C]`."""

  hidden: int = 2048
  out: int = 256
  num_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = _conv(
          self.out if last else self.hidden, 1, self.dtype, f'layers_{i}'
      )(x)
      x = x if last else nn.relu(x)
    return x


class SimpleFPN(nn.Module):
  """Built by the reference head but never used: its weights are in every
  checkpoint, so it exists here (created at init only)."""

  channel: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for name in ('up1_1', 'up2_1', 'up3_1'):
      _conv(self.channel, 3, self.dtype, name)(x)


class AVSegHead(nn.Module):
  """`feats` (4 x `[N, h_i, w_i, C_i]`), `audio [N, 1, 256]` -> dict with
  `pred [N, H, W, num_classes]` (H = 4 h_0), `mask_feature [N, h_0, w_0,
  256]`, `query`, `memory [N, S, 256]`, `decoder_out [N, Q, 256]`."""

  num_classes: int = 1
  query_num: int = 300
  embed_dim: int = 256
  valid_indices: Sequence[int] = (1, 2, 3)
  scale_factor: int = 4
  num_layers: int = 6
  generator_layers: int = 6
  ffn_dim: int = 2048
  mlp_dim: int = 2048
  dropout: float = 0.1
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats, audio):
    # long: the reference head's forward in order (projections, encoder,
    # query generator, decoder, mixer, mask head), compared stage by stage.
    d, c = self.dtype, self.embed_dim
    proj = lambda x, i: _group_norm(d, f'in_proj_{i}_1')(
        _conv(c, 1, d, f'in_proj_{i}_0')(x)
    )
    feat14 = proj(feats[0], 0)
    srcs = [proj(feats[i], i) for i in self.valid_indices]
    shapes = tuple((s.shape[1], s.shape[2]) for s in srcs)
    level_embed = self.param(
        'level_embed', nn.initializers.normal(1.0), (len(srcs), c), jnp.float32
    )
    n = feat14.shape[0]
    src = jnp.concatenate([s.reshape(n, -1, c) for s in srcs], 1)
    pos = jnp.concatenate(
        [
            jnp.asarray(sine_position_encoding(h, w, c // 2)).reshape(-1, c)
            + level_embed[i]
            for i, (h, w) in enumerate(shapes)
        ],
        0,
    )[None]

    query = AttentionGenerator(
        self.generator_layers, self.query_num, c, d, name='query_generator'
    )(audio)
    learnable = nn.Embed(
        self.query_num,
        c,
        embedding_init=XAVIER,
        param_dtype=jnp.float32,
        name='learnable_query',
    ).embedding
    query = query + learnable.astype(d)[None]

    layer = dict(dim=c, ffn_dim=self.ffn_dim, dropout=self.dropout)
    memory, out = Transformer(
        self.num_layers, layer, self.deterministic, d, name='transformer'
    )(query, src, pos.astype(d), shapes)

    h0, w0 = shapes[0]
    mem0 = memory[:, : h0 * w0].reshape(n, h0, w0, c)
    cur = _group_norm(d, 'lateral_conv_1')(
        _conv(c, 1, d, 'lateral_conv_0')(feat14)
    )
    mask_feature = cur + resize_bilinear(mem0, cur.shape[1:3], False)
    mask_feature = nn.relu(
        _group_norm(d, 'out_conv_1')(_conv(c, 3, d, 'out_conv_0')(mask_feature))
    )
    mask_feature = CrossModalMixer(c, dtype=d, name='fusion_block')(
        mask_feature, audio
    )

    pred = jnp.einsum('nqc,nhwc->nhwq', out, mask_feature)
    pred = mask_feature + MLP(self.mlp_dim, c, 3, d, name='mlp')(pred)
    pred = self._output(pred, 'fc')
    if self.is_initializing():  # unused by the reference, in its checkpoints
      SimpleFPN(c, d, name='fpn')(mask_feature[:1])
      self._output(mask_feature[:1], 'attn_fc')
    return dict(
        pred=pred,
        mask_feature=mask_feature,
        query=query,
        memory=memory,
        decoder_out=out,
    )

  def _output(self, x, name):
    d = self.dtype
    x = _conv(128, 3, d, f'{name}_0')(x)
    x = resize_bilinear(
        x,
        (self.scale_factor * x.shape[1], self.scale_factor * x.shape[2]),
        False,
    )
    x = nn.relu(_conv(32, 3, d, f'{name}_2')(x))
    return _conv(self.num_classes, 1, d, f'{name}_4', use_bias=False)(x)


class AVSegFormer(nn.Module):
  """AVSegFormer.

  `__call__(frames [B, T, H, W, 3], audio [B, T, 128], train,
  frame_mask=None [B, T])` returns a dict: `logits` `[B, T, H, W]` (one
  class) or `[B, T, H, W, num_classes]`, float32; `mask_feature`
  `[B, T, H/4, W/4, 256]` (what the mix loss consumes); `query`,
  `decoder_out` `[B, T, Q, 256]`; `memory` `[B, T, S, 256]`. `frame_mask`
  (AVSS's `vid_temporal_mask_flag`) zeroes the features and outputs of
  padded frames, as the reference does.
  """

  backbone: str = 'resnet50'
  num_classes: int = 1
  query_num: int = 300
  embed_dim: int = 256
  num_layers: int = 6
  generator_layers: int = 6
  ffn_dim: int = 2048
  mlp_dim: int = 2048  # the head's query-map MLP
  dropout: float = 0.1
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, frames, audio, train: bool = False, frame_mask=None):
    # long: the reference model's forward in order, compared stage by stage.
    b, t, h, w, _ = frames.shape
    if h % 32 or w % 32:
      raise ValueError(f'frame size must be a multiple of 32, got {h}x{w}')
    if audio is None or audio.shape[:2] != (b, t):
      raise ValueError(
          'AVSegFormer needs audio embeddings [B, T, 128] for '
          f'frames {frames.shape}, got '
          f'{None if audio is None else audio.shape}'
      )
    x = frames.reshape(b * t, h, w, 3).astype(self.dtype)
    if self.backbone in resnet.SPECS:
      blocks, width = resnet.SPECS[self.backbone]
      feats = resnet.ResNet(blocks, width, train, self.dtype, name='backbone')(
          x
      )
    elif self.backbone in pvt.SPECS:
      feats = pvt.PVTv2(
          pvt.SPECS[self.backbone],
          train,
          self.remat,
          self.dtype,
          name='backbone',
      )(x)
    else:
      raise ValueError(
          f'unknown backbone {self.backbone!r}; choose one of '
          f'{sorted(resnet.SPECS) + sorted(pvt.SPECS)}'
      )
    flag = None
    if frame_mask is not None:
      flag = frame_mask.reshape(b * t, 1, 1, 1).astype(self.dtype)
      feats = [f * flag for f in feats]
    a = _dense(self.embed_dim, self.dtype, 'audio_proj')(
        audio.reshape(b * t, 1, -1).astype(self.dtype)
    )
    out = AVSegHead(
        self.num_classes,
        self.query_num,
        self.embed_dim,
        num_layers=self.num_layers,
        generator_layers=self.generator_layers,
        ffn_dim=self.ffn_dim,
        mlp_dim=self.mlp_dim,
        dropout=self.dropout,
        deterministic=not train,
        dtype=self.dtype,
        name='head',
    )(feats, a)
    pred, mask_feature = out['pred'], out['mask_feature']
    if flag is not None:
      pred, mask_feature = pred * flag, mask_feature * flag
    logits = _f32(pred).reshape((b, t) + pred.shape[1:])
    if self.num_classes == 1:
      logits = logits[..., 0]
    per_frame = lambda v: v.reshape((b, t) + v.shape[1:])
    return dict(
        logits=logits,
        mask_feature=per_frame(mask_feature),
        query=per_frame(out['query']),
        memory=per_frame(out['memory']),
        decoder_out=per_frame(out['decoder_out']),
    )


def build_model(model_config, *, dtype=jnp.float32, remat=False) -> AVSegFormer:
  """AVSegFormer from a config's `model` section (`name == 'avsegformer'`)."""
  return AVSegFormer(
      backbone=model_config.backbone,
      num_classes=model_config.get('num_classes', 1),
      query_num=model_config.get('query_num', 300),
      embed_dim=model_config.get('embed_dim', 256),
      num_layers=model_config.get('num_layers', 6),
      generator_layers=model_config.get('generator_layers', 6),
      ffn_dim=model_config.get('ffn_dim', 2048),
      mlp_dim=model_config.get('mlp_dim', 2048),
      dropout=model_config.get('dropout', 0.1),
      remat=remat,
      dtype=dtype,
  )
