"""SAMA-AVS (Liu et al., WACV 2024): SAM with audio prompts in its ViT.

Reference: jinxiang-liu/anno-free-AVS (`models/sam.py`,
`models/mmseg/models/sam/{image_encoder,mask_decoder,transformer,common}.py`),
whose SAM modules are facebookresearch/segment-anything's. docs/SAMA.md has
the architecture with citations. Every frame is segmented on its own:

  frames [N, S, S, 3] -> patch embedding (16x16) + pos_embed -> depth ViT
  blocks (windowed or global attention, decomposed relative positions), each
  preceded by `x += prompt_i(audio)` -> neck -> image embedding [N, s, s, 256]
  mask decoder: tokens (iou + 4 mask) <-> image embedding + no_mask_embed
  (two-way transformer, random-Fourier positions) -> 4x up -> mask 0
  -> bilinear to the input size

Module names mirror the reference so that SAM's and SAMA-AVS's checkpoints
convert by name (`avs_jax.projects.sama.convert`). NHWC; clips
`[B, T, H, W, 3]` with VGGish embeddings `[B, T, 128]`, as the other
families.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avs_jax.models.layers import Dtype, conv, resize_bilinear

# SAM's encoders (segment_anything/build_sam.py): width, depth, heads, the
# blocks with global attention.
ENCODERS = {
    'vit_b': dict(embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11)),
    'vit_l': dict(embed_dim=1024, depth=24, num_heads=16, global_attn=(5, 11, 17, 23)),
    'vit_h': dict(embed_dim=1280, depth=32, num_heads=16, global_attn=(7, 15, 23, 31)),
}  # fmt: skip
ATTENTION = ('dot_product', 'einsum')


def _dense(features, dtype, name, use_bias=True, kernel_init=None):
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init or nn.initializers.lecun_normal(),
      name=name,
  )


def _layer_norm(eps, dtype, name):
  return nn.LayerNorm(
      epsilon=eps,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _embedding(num, dim, name):
  """The table of an `nn.Embed` (PyTorch `nn.Embedding`: N(0, 1) init)."""
  return nn.Embed(
      num, dim, embedding_init=nn.initializers.normal(1.0), name=name
  ).embedding


def _gelu(x):
  return nn.gelu(x, approximate=False)


def attention(q, k, v, bias, impl):
  """Softmax attention, `q [N, L, h, d]`, `k, v [N, M, h, d]`, `bias`
  broadcastable to `[N, h, L, M]` or None -> `[N, L, h, d]`.

  `impl='dot_product'`: `jax.nn.dot_product_attention`; `'einsum'`: the
  plain computation (float64 parity tests: `dot_product_attention` takes its
  softmax in float32). Both take the softmax in at least float32.
  """
  scale = q.shape[-1] ** -0.5
  if impl == 'dot_product':
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)
  if impl != 'einsum':
    raise ValueError(f'attention must be one of {ATTENTION}, got {impl!r}')
  logits = jnp.einsum('nlhd,nmhd->nhlm', q * scale, k)
  if bias is not None:
    logits = logits + bias
  wide = jnp.promote_types(logits.dtype, jnp.float32)
  probs = jax.nn.softmax(logits.astype(wide), axis=-1).astype(v.dtype)
  return jnp.einsum('nhlm,nmhd->nlhd', probs, v)


def _rel_index(size):
  """`[size, size]` indices `q - k + size - 1` into a `[2 size - 1]` table."""
  r = np.arange(size)
  return r[:, None] - r[None, :] + size - 1


class Attention(nn.Module):
  """ViT attention with decomposed relative positions, on `[N, H, W, C]`.

  `query_rows > 0` (and dividing H): the queries go through in chunks of
  that many token rows (`lax.map`, each chunk rematerialised in the
  backward pass), so that the `[L, L]` logits and relative-position bias of
  a global block (L = 4,096 at 1024 px) are never whole in memory; the
  softmax is still over every key, so the result is the same.
  """

  dim: int
  num_heads: int
  input_size: Sequence[int]  # (H, W) the rel-pos tables are made for
  use_rel_pos: bool = True
  impl: str = 'dot_product'
  dtype: Dtype = jnp.float32
  query_rows: int = 0

  @nn.compact
  def __call__(self, x):
    n, h, w, _ = x.shape
    m, d = self.num_heads, self.dim // self.num_heads
    qkv = _dense(3 * self.dim, self.dtype, 'qkv')(x)
    q, k, v = jnp.moveaxis(qkv.reshape(n, h * w, 3, m, d), 2, 0)
    if not self.use_rel_pos:
      out = attention(q, k, v, None, self.impl)
      return _dense(self.dim, self.dtype, 'proj')(out.reshape(n, h, w, -1))
    zeros = nn.initializers.zeros
    th = self.param('rel_pos_h', zeros, (2 * self.input_size[0] - 1, d))
    tw = self.param('rel_pos_w', zeros, (2 * self.input_size[1] - 1, d))
    if (h, w) != tuple(self.input_size):
      raise ValueError(
          f'tokens {h}x{w} do not fit rel-pos tables for {self.input_size}'
      )
    rh = th.astype(self.dtype)[_rel_index(h)]  # [h, h, d]
    rw = tw.astype(self.dtype)[_rel_index(w)]  # [w, w, d]

    def rows(rq, rh):
      """Query rows `rq [N, r, W, heads, d]`, their `rh [r, H, d]` ->
      `[N, r * W, heads, d]`."""
      r = rq.shape[1]
      bh = jnp.einsum('nhwmc,hkc->nmhwk', rq, rh)
      bw = jnp.einsum('nhwmc,wkc->nmhwk', rq, rw)
      bias = (bh[..., :, None] + bw[..., None, :]).reshape(n, m, r * w, h * w)
      return attention(rq.reshape(n, r * w, m, d), k, v, bias, self.impl)

    rq, c = q.reshape(n, h, w, m, d), self.query_rows
    if 0 < c < h and h % c == 0:
      chunks = (
          jnp.moveaxis(rq.reshape(n, h // c, c, w, m, d), 1, 0),
          rh.reshape(h // c, c, h, d),
      )
      out = jax.lax.map(lambda a: jax.checkpoint(rows)(*a), chunks)
      out = jnp.moveaxis(out, 0, 1)
    else:
      out = rows(rq, rh)
    return _dense(self.dim, self.dtype, 'proj')(out.reshape(n, h, w, self.dim))


def window_partition(x, size):
  """`[N, H, W, C]` -> `[N * nh * nw, size, size, C]`, zero-padded to whole
  windows (as the reference, after `norm1`)."""
  n, h, w, c = x.shape
  ph, pw = -h % size, -w % size
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(n, hp // size, size, wp // size, size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c)


def window_unpartition(x, size, hw):
  """Inverse of `window_partition`, padding removed: `[N, H, W, C]`."""
  h, w = hw
  hp, wp = h + (-h % size), w + (-w % size)
  c = x.shape[-1]
  x = x.reshape(-1, hp // size, wp // size, size, size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
  return x[:, :h, :w]


class MLPBlock(nn.Module):
  """`lin2(act(lin1(x)))`."""

  dim: int
  hidden: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    act = _gelu if self.act == 'gelu' else nn.relu
    x = act(_dense(self.hidden, self.dtype, 'lin1')(x))
    return _dense(self.dim, self.dtype, 'lin2')(x)


class Block(nn.Module):
  """Pre-norm ViT block; `window_size=0` attends globally. `[N, H, W, C]`."""

  dim: int
  num_heads: int
  mlp_ratio: float
  window_size: int
  token_size: Sequence[int]
  use_rel_pos: bool = True
  impl: str = 'dot_product'
  dtype: Dtype = jnp.float32
  query_rows: int = 0

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    ws = self.window_size
    shortcut = x
    x = _layer_norm(1e-6, self.dtype, 'norm1')(x)
    if ws:
      x = window_partition(x, ws)
    x = Attention(
        self.dim,
        self.num_heads,
        (ws, ws) if ws else tuple(self.token_size),
        self.use_rel_pos,
        self.impl,
        self.dtype,
        query_rows=self.query_rows,
        name='attn',
    )(x)
    if ws:
      x = window_unpartition(x, ws, (h, w))
    x = shortcut + x
    y = _layer_norm(1e-6, self.dtype, 'norm2')(x)
    hidden = int(self.dim * self.mlp_ratio)
    return x + MLPBlock(self.dim, hidden, 'gelu', self.dtype, name='mlp')(y)


class AudioPromptGenerator(nn.Module):
  """One prompt per block from the audio: `[N, 128]` -> `[depth, N, D]`.

  `prompt_i = shared_mlp(GELU(lightweight_mlp_i(audio)))`.
  """

  embed_dim: int
  depth: int
  hidden: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio):
    init = nn.initializers.truncated_normal(0.02)
    h = jnp.stack(
        [
            _gelu(
                _dense(
                    self.hidden,
                    self.dtype,
                    f'lightweight_mlp_{i}_0',
                    True,
                    init,
                )(audio)
            )
            for i in range(self.depth)
        ]
    )
    return _dense(self.embed_dim, self.dtype, 'shared_mlp', True, init)(h)


class PatchEmbed(nn.Module):
  """`proj`: a `p x p` conv of stride p, `[N, S, S, 3]` -> `[N, S/p, S/p, D]`."""

  embed_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    return conv(self.embed_dim, p, p, 0, dtype=self.dtype, name='proj')(x)


class ImageEncoderViT(nn.Module):
  """SAM's ViT with audio prompts: frames `[N, S, S, 3]`, audio `[N, 128]`
  -> image embedding `[N, S/p, S/p, out_chans]`."""

  image_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  global_attn: Sequence[int] = (2, 5, 8, 11)
  window_size: int = 14
  mlp_ratio: float = 4.0
  out_chans: int = 256
  impl: str = 'dot_product'
  remat: bool = False
  dtype: Dtype = jnp.float32
  query_rows: int = 0  # Attention's chunking of global blocks (0: none)

  @nn.compact
  def __call__(self, x, audio):
    s = self.image_size // self.patch_size
    x = PatchEmbed(
        self.embed_dim, self.patch_size, self.dtype, name='patch_embed'
    )(x)
    if x.shape[1:3] != (s, s):
      raise ValueError(
          f'frames must be {self.image_size}x{self.image_size} (the size of '
          f'pos_embed), got {x.shape[1] * self.patch_size}x'
          f'{x.shape[2] * self.patch_size}'
      )
    prompts = AudioPromptGenerator(
        self.embed_dim, self.depth, dtype=self.dtype, name='prompt_generator'
    )(audio)
    pos = self.param(
        'pos_embed', nn.initializers.zeros, (1, s, s, self.embed_dim)
    )
    x = x + pos.astype(self.dtype)
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = x + prompts[i][:, None, None, :]
      x = block(
          self.embed_dim,
          self.num_heads,
          self.mlp_ratio,
          0 if i in self.global_attn else self.window_size,
          (s, s),
          impl=self.impl,
          dtype=self.dtype,
          query_rows=self.query_rows,
          name=f'blocks_{i}',
      )(x)
    x = conv(
        self.out_chans, 1, use_bias=False, dtype=self.dtype, name='neck_0'
    )(x)
    x = _layer_norm(1e-6, self.dtype, 'neck_1')(x)
    x = conv(
        self.out_chans, 3, 1, 1, use_bias=False, dtype=self.dtype, name='neck_2'
    )(x)
    return _layer_norm(1e-6, self.dtype, 'neck_3')(x)


class PositionEmbeddingRandom(nn.Module):
  """Random-Fourier positions of the pixel centres of an `s x s` grid:
  `[s, s, 2 F]` (sin, then cos), coordinates (x, y) in [0, 1]; computed in
  at least float32 (the phases reach tens of radians), returned in `dtype`."""

  num_pos_feats: int = 128

  @nn.compact
  def __call__(self, s, dtype):
    wide = jnp.promote_types(dtype, jnp.float32)
    g = self.param(
        'positional_encoding_gaussian_matrix',
        nn.initializers.normal(1.0),
        (2, self.num_pos_feats),
    ).astype(wide)
    c = (jnp.arange(s, dtype=wide) + 0.5) / s
    xy = jnp.stack(jnp.meshgrid(c, c, indexing='xy'), -1)  # [s, s, (x, y)]
    xy = 2 * math.pi * ((2 * xy - 1) @ g)
    return jnp.concatenate([jnp.sin(xy), jnp.cos(xy)], -1).astype(dtype)


class DecoderAttention(nn.Module):
  """SAM's two-way transformer attention: q/k/v projected to
  `dim / downsample_rate`, `num_heads` heads, `out_proj` back to `dim`."""

  dim: int = 256
  num_heads: int = 8
  downsample_rate: int = 1
  impl: str = 'dot_product'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):
    inner = self.dim // self.downsample_rate
    m, d = self.num_heads, inner // self.num_heads
    split = lambda x: x.reshape(x.shape[:2] + (m, d))
    q = split(_dense(inner, self.dtype, 'q_proj')(q))
    k = split(_dense(inner, self.dtype, 'k_proj')(k))
    v = split(_dense(inner, self.dtype, 'v_proj')(v))
    out = attention(q, k, v, None, self.impl)
    out = out.reshape(out.shape[:2] + (inner,))
    return _dense(self.dim, self.dtype, 'out_proj')(out)


class TwoWayAttentionBlock(nn.Module):
  """Tokens `[N, K, C]` and image tokens `[N, L, C]` attend to each other."""

  dim: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  skip_first_layer_pe: bool = False
  impl: str = 'dot_product'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    d = self.dtype
    att = lambda rate, name: DecoderAttention(
        self.dim, self.num_heads, rate, self.impl, d, name=name
    )
    ln = lambda name: _layer_norm(1e-5, d, name)
    if self.skip_first_layer_pe:  # no residual, no PE (the reference)
      queries = att(1, 'self_attn')(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + att(1, 'self_attn')(q, q, queries)
    queries = ln('norm1')(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = queries + att(2, 'cross_attn_token_to_image')(q, k, keys)
    queries = ln('norm2')(queries)
    mlp = MLPBlock(self.dim, self.mlp_dim, 'relu', d, name='mlp')
    queries = ln('norm3')(queries + mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = keys + att(2, 'cross_attn_image_to_token')(k, q, queries)
    return queries, ln('norm4')(keys)


class TwoWayTransformer(nn.Module):
  """`image [N, L, C]`, `image_pe [1, L, C]`, `tokens [N, K, C]` ->
  (tokens, image) after `depth` two-way blocks and a last token->image
  attention."""

  depth: int = 2
  dim: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  impl: str = 'dot_product'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image, image_pe, tokens):
    queries, keys = tokens, image
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.dim,
          self.num_heads,
          self.mlp_dim,
          i == 0,
          self.impl,
          self.dtype,
          name=f'layers_{i}',
      )(queries, keys, tokens, image_pe)
    q, k = queries + tokens, keys + image_pe
    queries = queries + DecoderAttention(
        self.dim, self.num_heads, 2, self.impl, self.dtype,
        name='final_attn_token_to_image',
    )(q, k, keys)  # fmt: skip
    return _layer_norm(1e-5, self.dtype, 'norm_final_attn')(queries), keys


class MLP(nn.Module):
  """`layers_{i}`: Linear layers, ReLU between them."""

  hidden: int
  out: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = _dense(self.out if last else self.hidden, self.dtype, f'layers_{i}')(
          x
      )
      x = x if last else nn.relu(x)
    return x


class ConvTranspose2x2(nn.Module):
  """`torch.nn.ConvTranspose2d(kernel_size=2, stride=2)`: `[N, H, W, I]` ->
  `[N, 2H, 2W, O]`; `kernel [2, 2, I, O]`."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    k = self.param(
        'kernel', nn.initializers.lecun_normal(), (2, 2, c, self.features)
    )
    b = self.param('bias', nn.initializers.zeros, (self.features,))
    y = jnp.einsum('nhwi,abio->nhawbo', x, k.astype(self.dtype))
    return y.reshape(n, 2 * h, 2 * w, self.features) + b.astype(self.dtype)


class MaskDecoder(nn.Module):
  """SAM's mask decoder with no sparse prompts: image embedding
  `[N, s, s, C]` (the dense prompt already added), `image_pe [s, s, C]` ->
  (mask logits `[N, 4s, 4s, 4]`, IoU predictions `[N, 4]`)."""

  dim: int = 256
  num_mask_tokens: int = 4
  impl: str = 'dot_product'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, src, image_pe):
    n, s, _, c = src.shape
    d = self.dtype
    tokens = jnp.concatenate(
        [
            _embedding(1, c, 'iou_token'),
            _embedding(self.num_mask_tokens, c, 'mask_tokens'),
        ],
        0,
    ).astype(d)
    tokens = jnp.broadcast_to(tokens, (n,) + tokens.shape)
    hs, img = TwoWayTransformer(
        dim=c, impl=self.impl, dtype=d, name='transformer'
    )(src.reshape(n, s * s, c), image_pe.reshape(1, s * s, c), tokens)
    img = img.reshape(n, s, s, c)
    up = ConvTranspose2x2(c // 4, d, name='output_upscaling_0')(img)
    up = _gelu(_layer_norm(1e-6, d, 'output_upscaling_1')(up))
    up = _gelu(ConvTranspose2x2(c // 8, d, name='output_upscaling_3')(up))
    hyper = jnp.stack(
        [
            MLP(c, c // 8, 3, d, name=f'output_hypernetworks_mlps_{i}')(
                hs[:, 1 + i]
            )
            for i in range(self.num_mask_tokens)
        ],
        1,
    )
    masks = jnp.einsum('nkc,nhwc->nhwk', hyper, up)
    iou = MLP(256, self.num_mask_tokens, 3, d, name='iou_prediction_head')(
        hs[:, 0]
    )
    return masks, iou


class SAMA(nn.Module):
  """SAMA-AVS.

  `__call__(frames [B, T, H, W, 3], audio [B, T, 128], train=False)` returns
  `logits [B, T, H, W]` (float32 or wider), `low_res_logits
  [B, T, 4s, 4s]`, `image_embedding [B, T, s, s, prompt_embed_dim]` and `iou_pred
  [B, T]` (s = H / patch_size). `train` is unused (no dropout, no
  BatchNorm); it is there for the project's model interface.
  """

  encoder: str = 'vit_b'
  image_size: int = 1024
  patch_size: int = 16
  window_size: int = 14
  embed_dim: int = 0  # 0: the encoder's own; set with depth etc. for tiny ViTs
  depth: int = 0
  num_heads: int = 0
  global_attn: Sequence[int] = ()
  prompt_embed_dim: int = 256
  attention: str = 'dot_product'
  attention_rows: int = 0  # query token rows per chunk in global attention
  remat: bool = False
  dtype: Dtype = jnp.float32

  def encoder_spec(self):
    """`ENCODERS[encoder]`, with the fields set here (non-zero) overriding;
    `encoder='custom'` takes them all from here (tiny ViTs)."""
    spec = dict(ENCODERS.get(self.encoder, {}))
    if self.encoder != 'custom' and not spec:
      raise ValueError(
          f'unknown encoder {self.encoder!r}; choose one of '
          f'{sorted(ENCODERS) + ["custom"]}'
      )
    for k in ('embed_dim', 'depth', 'num_heads', 'global_attn'):
      if getattr(self, k):
        spec[k] = (
            tuple(getattr(self, k)) if k == 'global_attn' else getattr(self, k)
        )
    return spec

  @nn.compact
  def __call__(self, frames, audio, train: bool = False):
    del train
    b, t, h, w, _ = frames.shape
    if audio is None or audio.shape[:2] != (b, t):
      raise ValueError(
          f'SAMA needs audio embeddings [B, T, 128] for frames {frames.shape},'
          f' got {None if audio is None else audio.shape}'
      )
    d = self.dtype
    emb = ImageEncoderViT(
        self.image_size,
        self.patch_size,
        window_size=self.window_size,
        out_chans=self.prompt_embed_dim,
        impl=self.attention,
        remat=self.remat,
        dtype=d,
        query_rows=self.attention_rows,
        name='image_encoder',
        **self.encoder_spec(),
    )(
        frames.reshape(b * t, h, w, 3).astype(d),
        audio.reshape(b * t, -1).astype(d),
    )
    s = emb.shape[1]
    pe = PositionEmbeddingRandom(self.prompt_embed_dim // 2, name='pe_layer')(
        s, d
    )
    dense = _embedding(1, self.prompt_embed_dim, 'no_mask_embed')
    masks, iou = MaskDecoder(
        self.prompt_embed_dim, impl=self.attention, dtype=d, name='mask_decoder'
    )(emb + dense[0].astype(d), pe)
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    low = wide(masks[..., :1])  # multimask_output=False: mask 0
    up = resize_bilinear(low, (h, w), align_corners=False)[..., 0]
    per_frame = lambda x: x.reshape((b, t) + x.shape[1:])
    return dict(
        logits=per_frame(wide(up)),
        low_res_logits=per_frame(low[..., 0]),
        image_embedding=per_frame(emb),
        iou_pred=per_frame(wide(iou[:, 0])),
    )


def build_model(model_config, *, dtype=jnp.float32, remat=False) -> SAMA:
  """SAMA from a config's `model` section (`name == 'sama'`)."""
  return SAMA(
      encoder=model_config.encoder,
      image_size=model_config.get('image_size', 1024),
      patch_size=model_config.get('patch_size', 16),
      window_size=model_config.get('window_size', 14),
      embed_dim=model_config.get('embed_dim', 0),
      depth=model_config.get('depth', 0),
      num_heads=model_config.get('num_heads', 0),
      global_attn=tuple(model_config.get('global_attn', ())),
      prompt_embed_dim=model_config.get('prompt_embed_dim', 256),
      attention=model_config.get('attention', 'dot_product'),
      attention_rows=model_config.get('attention_rows', 0),
      remat=remat,
      dtype=dtype,
  )
