"""Ghost-norm / book-keeping clipping: the clipped sum from one backward pass.

`clipped_grad(..., method="ghost")` returns the same thing as the vmap path
(the sum over units of each unit's clipped gradient) without materialising a
per-unit gradient of the big layers. For a linear layer `y = x W` a unit's
weight gradient is `x^T g` (`x` its inputs `[T, d_in]`, `g` the loss gradient
at its outputs `[T, d_out]`), so

- its norm is `sum_{t,s} (x_t . x_s)(g_t . g_s)` (ghost norm, Li et al. 2021,
  arXiv 2110.05679; cost T^2 (d_in + d_out)), or that of the materialised
  `x^T g` (cost T d_in d_out, which the weight gradient costs anyway, and
  d_in d_out memory per unit) -- `materialise` picks per layer, weighing time
  and memory (the mixed rule of Bu et al., arXiv 2205.10683; an embedding's
  `x` is one-hot, its Gram a token-equality matrix, its materialised
  gradient a scatter of `g`);
- the clipped sum is `sum_u c_u x_u^T g_u`, one einsum over activations,
  output gradients and clip factors (book-keeping, Bu et al., arXiv
  2210.00038): no second backward pass.

How the layers are seen: inside the loss, linen's `nn.Dense` and
`nn.DenseGeneral` (`__call__`, contracting the input's trailing axes, no
batch dims, no custom `dot_general`) and `nn.Embed` (`__call__` and
`attend`) calls are intercepted (`flax.linen.intercept_methods`), and so
are those of subclasses that keep the base class's method (one that
overrides it has its own math and gets no rule); each records its input
and adds a zero "tap" to its output, whose gradient is `g`. LoRA factors
(`dpjax.models.adapters.lora`) are applied as two such Dense calls, so they
get the rule too. A parameter of `LARGE_FALLBACK` entries or more left to
the vmap path is named in a warning. One vmapped backward pass w.r.t.
the taps and the remaining parameters gives every `g` and the per-unit
gradients of the parameters without a rule (norm scales, prefixes, LoRA
factors, raw parameters): those fall back to the vmap path, per parameter.
A weight shared by several layers (a tied embedding used for lookup and for
the logits) gets the cross terms of its uses in the norm.

A weight is taken by the ghost rule only if every use of it in the loss is an
intercepted layer call. This is checked when the function is traced: the
loss is differentiated forward w.r.t. every weight with the intercepted uses
cut, and a weight whose tangent still reaches anything (a regulariser on it,
a manual `x @ W`) falls back to vmap. So the result equals the vmap path's
whatever the loss does with its parameters; only the speed differs.

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp, dpjax
  >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
  >>> x = jnp.ones((4, 3, 5))                              # [units, T, features]
  >>> params = model.init(jax.random.key(0), x[0])["params"]
  >>> loss = lambda p, xu: jnp.mean(model.apply({"params": p}, xu) ** 2)
  >>> grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="ghost")
  >>> grads, aux = grad_fn(params, x)                      # as with method="vmap"
  >>> grad_fn.rules(params, x)["layers_0/kernel"]
  'ghost'
  >>> ref, _ = dpjax.clipped_grad(loss, l2_clip_norm=1.0)(params, x)
  >>> bool(jnp.allclose(grads["layers_0"]["kernel"], ref["layers_0"]["kernel"], atol=1e-5))
  True

Formal guarantees: those of `clipped_grad` (add/remove sensitivity C, or
the norm of the per-group bounds), because every unit's contribution is
`c_u` times one vector -- the sum over the parameters of `x_u^T g_u`, the
materialised rows, or the vmap gradient -- and `c_u` is computed from the
norm of that same vector (the ghost norm is its exact norm, not an
estimate). Which rule computes a parameter never depends on the data, only
on shapes and on how the loss uses the parameter. As on the vmap path, the
bound holds up to floating-point rounding of the norm (relative ~1e-6 in
f32; norms and sums are accumulated in f32 under bf16 compute).

User-level units: a loss built by `dpjax.core.clipping.group_mean` (a user's G
examples, the weighted mean of a per-example loss) is opened up: each
example runs under its own tape and the user's rows are its examples' rows,
so the layers keep their rule. A loss that writes the group as one batch
(`model.apply` on `[G, T]`) works as it is.

Limits: only L2 clipping (there is no ghost L1 norm). A layer called inside
a transform of the loss's own (an inner `jax.vmap` other than
`group_mean`'s, `nn.scan`, `nn.remat`, an inner `jax.jit`) runs under
another trace; it gets no rule and its weights take the vmap path
(correct, not faster).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.core.clipping.base import ClippedGradFn, GroupMean

PyTree = Any
_F32 = jnp.float32


class _Site(NamedTuple):
  """One intercepted layer call, in call order (static, found at trace time)."""

  kind: str  # "dense" | "embed" | "attend"
  weight: int  # flat index of its weight leaf
  bias: Optional[int]  # flat index of its bias leaf (dense with bias)
  out: jax.ShapeDtypeStruct  # per-unit output (the tap's shape)
  n_in: int = 1  # dense: trailing input axes contracted with the kernel's leading axes
  n_out: int = 1  # dense: the kernel's trailing (feature) axes


def _inherits(module, base, method: str) -> bool:
  """`module` is `base` or a subclass that keeps `base`'s `method` (so its math)."""
  return isinstance(module, base) and getattr(type(module), method) is getattr(base, method)


def _plain_dot(module) -> bool:
  """No custom dot_general (e.g. a quantised one): the layer is x @ W."""
  return getattr(module, "dot_general", None) is None and (
    getattr(module, "dot_general_cls", None) is None
  )


def _call_site(module, method: str, args, kwargs, index_of: Dict[int, int]):
  """(kind, weight, bias, layer input, n_in, n_out) when this call has a rule, else None."""
  if not (args or kwargs):
    return None
  x = args[0] if args else next(iter(kwargs.values()))
  params = module.variables.get("params", {})
  dense = method == "__call__" and _plain_dot(module)
  n_in = n_out = 1
  if dense and _inherits(module, nn.DenseGeneral, "__call__"):
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feats = module.features if isinstance(module.features, tuple) else (module.features,)
    nd = jnp.ndim(x)
    # Contraction over x's trailing axes in order, no batch dims: x W after flattening.
    trailing = tuple(range(nd - len(axis), nd))
    if module.batch_dims or tuple(a % nd for a in axis) != trailing:
      return None
    n_in, n_out = len(axis), len(feats)
  elif not (dense and _inherits(module, nn.Dense, "__call__")):
    dense = False
  if dense:
    w = index_of.get(id(params.get("kernel")))
    if w is None:
      return None
    # An untracked bias (frozen, or not a leaf of params) is a constant of the
    # layer; a tracked one is taken with its kernel.
    b = index_of.get(id(params.get("bias"))) if module.use_bias else None
    return "dense", w, b, x, n_in, n_out
  if method in ("__call__", "attend") and _inherits(module, nn.Embed, method):
    w = index_of.get(id(params.get("embedding")))
    if w is None:
      return None
    return ("embed" if method == "__call__" else "attend"), w, None, x, 1, 1
  return None


def _apply_cut(module, method: str, args, kwargs):
  """The layer's output with no derivative w.r.t. its own variables."""
  variables = jax.tree.map(jax.lax.stop_gradient, dict(module.variables))
  clone = module.clone(parent=None)
  return clone.apply(variables, *args, method=method, **kwargs)


class _Tape:
  """The interceptor of one trace: records sites ("plan") or taps them ("run")."""

  def __init__(
    self,
    index_of: Dict[int, int],
    sites: Optional[Sequence[_Site]] = None,
    taps: Optional[Sequence[jax.Array]] = None,
  ):
    self.index_of = index_of
    self.planning = sites is None
    self.sites: List[_Site] = [] if sites is None else list(sites)
    self.taps = taps
    self.inputs: List[jax.Array] = []
    self._inside = False
    self._trace = _current_trace()

  def __call__(self, next_fun, args, kwargs, context):
    # A layer inside a transform of the loss's own (an inner vmap, scan, jit)
    # runs under another trace: its inputs cannot leave it, so no rule.
    if self._inside or _current_trace() is not self._trace:
      return next_fun(*args, **kwargs)
    found = _call_site(context.module, context.method_name, args, kwargs, self.index_of)
    if found is None:
      return next_fun(*args, **kwargs)
    kind, w, b, x, n_in, n_out = found
    if self.planning:
      self._inside = True
      try:
        out = _apply_cut(context.module, context.method_name, args, kwargs)
      finally:
        self._inside = False
      shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
      self.sites.append(_Site(kind, w, b, shape, n_in, n_out))
      return out
    k = len(self.inputs)
    if k >= len(self.sites) or self.sites[k][:3] != (kind, w, b):
      raise RuntimeError(
        "ghost clipping: the loss called its layers differently on a second trace "
        f"(call {k}: {kind} of leaf {w}); the loss must be a deterministic function "
        "of its inputs' shapes"
      )
    out = next_fun(*args, **kwargs)
    if out.shape != self.sites[k].out.shape:
      raise RuntimeError(
        f"ghost clipping: layer output {out.shape} != traced {self.sites[k].out.shape}"
      )
    self.inputs.append(x)
    return out + self.taps[k].astype(out.dtype)


def _current_trace():
  try:
    from jax._src import core

    return core.trace_ctx.trace
  except (ImportError, AttributeError):
    return None


@contextlib.contextmanager
def _intercept(tape: _Tape):
  with nn.intercept_methods(tape):
    yield


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _used_inputs(jaxpr) -> List[bool]:
  """Which inputs of a jaxpr reach its outputs (dead code removed, sub-jaxprs included)."""
  try:
    from jax._src.interpreters import partial_eval as pe

    return list(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[1])
  except (ImportError, AttributeError):  # conservative: any mention counts as a use
    from jax.extend.core import Literal

    used = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal)}
    used |= {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    return [v in used for v in jaxpr.invars]


def _gram(a_kind: str, a, b_kind: str, b):
  """Per-unit Gram `[U, Ta, Tb]` (f32) of two row sets; "index" rows are one-hot ids."""
  if a_kind == "index" and b_kind == "index":
    return (a[:, :, None] == b[:, None, :]).astype(_F32)
  if a_kind == "dense" and b_kind == "dense":
    return jnp.einsum("uti,usi->uts", a, b, preferred_element_type=_F32)
  if a_kind == "index":
    return jnp.swapaxes(_gram(b_kind, b, a_kind, a), 1, 2)
  idx = jnp.broadcast_to(b[:, None, :], a.shape[:2] + b.shape[1:])
  return jnp.take_along_axis(a, idx, axis=2).astype(_F32)


class _Use(NamedTuple):
  """A weight's per-unit gradient is sum over uses of `left^T right`."""

  left_kind: str  # "dense": left [U, T, rows]; "index": left [U, T] row ids
  left: jax.Array
  right: jax.Array  # [U, T, cols]


def _matrix_shape(site: _Site, shape) -> tuple:
  """(rows, cols) of a weight as the matrix its layer multiplies by."""
  if site.kind != "dense":
    return tuple(shape)
  return math.prod(shape[: site.n_in]), math.prod(shape[site.n_in :])


def materialise(t: int, rows: int, cols: int, held: Optional[int] = None) -> bool:
  """The mixed rule: materialise a unit's `rows x cols` gradient from its `t` rows of inputs
  and output gradients, or take ghost norms (True: materialise).

  Ghost norms cost about t^2 (rows + cols) per unit and hold t x t Grams; a
  materialised gradient costs no more than the weight gradient the step computes
  anyway (t rows cols) and holds rows x cols per unit. Materialise when that
  gradient is no larger than what the layer holds per unit already, its inputs and
  output gradients (`held`; t (rows + cols) for a dense layer: ghost norms are then
  also the slower, t^2 (rows + cols) >= rows cols), or when it is smaller than the
  Grams (t^2 > rows cols).

  Example:
    >>> materialise(256, 2048, 2048), materialise(1024, 2048, 2048)
    (False, True)
    >>> vocab, d = 128256, 2048  # a tied embedding: the lookup's ids and g, the logits' g and x
    >>> tuple(materialise(2 * t, vocab, d, t * (1 + d) + t * (vocab + d)) for t in (1024, 2048))
    (False, True)

  Args:
    t: the unit's rows at the layer (tokens over its uses, times the group's examples).
    rows: the weight's rows (its inputs).
    cols: its columns (its outputs).
    held: elements of the layer's inputs and output gradients per unit (default
      t (rows + cols)).

  Returns:
    Whether to materialise.
  """
  held = t * (rows + cols) if held is None else held
  return rows * cols <= held or t * t > rows * cols


def _rules(sites: Sequence[_Site], leaves, group_size: int = 1) -> Dict[int, str]:
  """The mixed rule (`materialise`) per taken leaf (t: the unit's rows)."""
  tokens: Dict[int, int] = {}
  held: Dict[int, int] = {}
  matrix: Dict[int, tuple] = {}
  out = {}
  for s in sites:
    t = group_size
    for d in s.out.shape[: len(s.out.shape) - s.n_out]:  # rows of x^T g: all but the features
      t *= d
    rows, cols = matrix[s.weight] = _matrix_shape(s, leaves[s.weight].shape)
    tokens[s.weight] = tokens.get(s.weight, 0) + t
    # A lookup holds ids and g [t, cols]; the logits (attend) g [t, rows] and x [t, cols].
    held[s.weight] = held.get(s.weight, 0) + t * ((1 if s.kind == "embed" else rows) + cols)
    if s.bias is not None:
      out[s.bias] = "materialised"
  for i, t in tokens.items():
    rows, cols = matrix[i]
    out[i] = "materialised" if materialise(t, rows, cols, held[i]) else "ghost"
  return out


def _materialise(u: _Use, shape, n_units: int):
  """The per-unit gradient `left^T right` of one use, `[U, *shape]` (f32)."""
  if u.left_kind == "dense":
    g = jnp.einsum("uti,utj->uij", u.left, u.right, preferred_element_type=_F32)
    return g.reshape((n_units,) + tuple(shape))
  units = jnp.arange(n_units)[:, None]
  return (
    jnp.zeros((n_units,) + tuple(shape), _F32)
    .at[units, u.left]
    .add(u.right.astype(_F32), mode="drop")
  )


LARGE_FALLBACK = 1_000_000  # entries of a parameter whose vmap fallback is warned about


def _warn_large_fallbacks(params, fallback: Sequence[int]) -> None:
  """Warns (once per trace) naming the large parameters that take the vmap path."""
  big = [
    f"{jax.tree_util.keystr(path, simple=True, separator='/')} ({leaf.size:,})"
    for i, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    if i in set(fallback) and jnp.size(leaf) >= LARGE_FALLBACK
  ]
  if big:
    warnings.warn(
      f"ghost clipping: {', '.join(big)} have no ghost rule (not used only through linen "
      "nn.Dense / nn.DenseGeneral / nn.Embed calls) and take the vmap path, with their "
      "per-example gradients materialised; see GhostClippedGradFn.rules",
      UserWarning,
      stacklevel=4,
    )


class GhostClippedGradFn(ClippedGradFn):
  """`clipped_grad(..., method="ghost")`; see the module docstring."""

  method = "ghost"

  def _plan(self, leaves, treedef, batch, args):
    """(sites, the weight leaves the ghost rule may take, rows per unit's group).

    Traced on one unit (or one example of a `group_mean` unit), not run.
    """
    unit = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch)
    group_size = 1
    if self._group is not None:  # the layers are traced on one example of the unit
      group_size = batch.example_mask.shape[1]
      unit = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[2:], jnp.result_type(x)), batch.examples
      )
    cand = [i for i, x in enumerate(leaves) if _is_float(x)]
    abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t
    )
    tape_box = []

    def forward(all_leaves, unit, args, cand_tangents):
      def loss_of(cand_leaves):
        full = list(all_leaves)
        for i, v in zip(cand, cand_leaves):
          full[i] = v
        ids = [id(full[i]) for i in cand]
        index_of = {id(full[i]): i for i in cand if ids.count(id(full[i])) == 1}
        tape = _Tape(index_of)
        tape_box.append(tape)
        with _intercept(tape):
          loss, _ = self._traced_loss(jax.tree.unflatten(treedef, full), unit, args)
        return loss

      primals = [all_leaves[i] for i in cand]
      return jax.jvp(loss_of, (primals,), (cand_tangents,))[1]

    tangents = [abstract(leaves[i]) for i in cand]
    closed = jax.make_jaxpr(forward)(abstract(leaves), unit, abstract(args), tangents)
    sites = tape_box[-1].sites
    n_in = len(jax.tree.leaves((abstract(leaves), unit, abstract(args))))
    used = _used_inputs(closed.jaxpr)[n_in:]
    clean = {i for i, u in zip(cand, used) if not u}
    # A weight is taken iff it has no other use and every site it is in is taken.
    taken = {s.weight for s in sites} | {s.bias for s in sites if s.bias is not None}
    taken &= clean
    while True:
      bad = {
        i
        for s in sites
        for i in (s.weight, s.bias)
        if i is not None and not (s.weight in taken and (s.bias is None or s.bias in taken))
      }
      if not bad & taken:
        break
      taken -= bad
    return [s for s in sites if s.weight in taken], taken, group_size

  def clip_chunk(self, params, batch, mask, args):
    """`ClippedGradFn.clip_chunk` by ghost norms and book-keeping (one backward pass).

    Args:
      params: the parameters differentiated.
      batch: one chunk of units.
      mask: [U], 1 for a real unit, 0 for padding.
      args: the extra non-batch arguments of `loss_fn`.

    Returns:
      (the clipped sum, the chunk's aux), equal to the vmap strategy's.
    """
    if self.norm_ord != 2:
      raise ValueError("ghost clipping computes L2 norms only; use method='vmap' with l1_clip_norm")
    leaves, treedef = jax.tree.flatten(params)
    sites, taken, group_size = self._plan(leaves, treedef, batch, args)
    fallback = [i for i in range(len(leaves)) if i not in taken]
    n_units = mask.shape[0]
    _warn_large_fallbacks(params, fallback)

    def taped(fb_leaves, taps, unit):
      """(loss, aux) and the recorded layer inputs of one traced call."""
      full = list(leaves)
      for i, v in zip(fallback, fb_leaves):
        full[i] = v
      tape = _Tape({id(leaves[i]): i for i in taken}, sites, taps)
      with _intercept(tape):
        out = self._traced_loss(jax.tree.unflatten(treedef, full), unit, args)
      if len(tape.inputs) != len(sites):
        raise RuntimeError(f"ghost clipping: {len(tape.inputs)} layer calls, traced {len(sites)}")
      return out, tuple(tape.inputs)

    group = self._group

    def unit_fn(fb_leaves, taps, unit):
      if group is None:
        (loss, aux), inputs = taped(fb_leaves, taps, unit)
        return loss, (aux, inputs)
      # One user's G examples, each under its own tape (inside this vmap): its
      # rows are the G examples' rows, weighted through the mean's gradient.
      w, examples = group.split(unit)
      outs, inputs = jax.vmap(taped, in_axes=(None, 0, 0))(fb_leaves, taps, examples)
      if group.has_aux:
        loss, aux = group.combine(w, outs)
      else:
        loss, aux = group.combine(w, outs[0]), None
      return loss, (aux, inputs)

    per_unit = () if group is None else (group_size,)
    taps = [jnp.zeros((n_units,) + per_unit + s.out.shape, s.out.dtype) for s in sites]
    grad_fn = jax.value_and_grad(unit_fn, argnums=(0, 1), has_aux=True)
    (loss, (aux, inputs)), (g_fb, g_taps) = jax.vmap(grad_fn, in_axes=(None, 0, 0))(
      [leaves[i] for i in fallback], taps, batch
    )

    # Per-unit gradient of each leaf: materialised (fallback, biases) or as uses.
    dense_grads: Dict[int, jax.Array] = dict(zip(fallback, g_fb))
    uses: Dict[int, List[_Use]] = {}

    def flat(a, last=1):
      """[U, ..., f_1..f_last] -> [U, rows, prod(f)] (last = 0: [U, rows])."""
      feats = a.shape[a.ndim - last :] if last else ()
      size = 1
      for d in feats:
        size *= d
      return a.reshape((n_units, -1) + ((size,) if last else ()))

    for s, x, g in zip(sites, inputs, g_taps):
      if s.kind == "dense":
        uses.setdefault(s.weight, []).append(_Use("dense", flat(x, s.n_in), flat(g, s.n_out)))
        if s.bias is not None:
          gb = jnp.sum(flat(g, s.n_out).astype(_F32), axis=1)
          dense_grads[s.bias] = dense_grads[s.bias] + gb if s.bias in dense_grads else gb
      elif s.kind == "embed":
        uses.setdefault(s.weight, []).append(_Use("index", flat(x, 0), flat(g)))
      else:  # attend: logits = x E^T, so dE = g^T x
        uses.setdefault(s.weight, []).append(_Use("dense", flat(g), flat(x)))

    rules = _rules(sites, leaves, group_size)
    matrix_of = {s.weight: _matrix_shape(s, leaves[s.weight].shape) for s in sites}
    sq: Dict[int, jax.Array] = {}
    for i, us in list(uses.items()):
      if rules[i] == "materialised":
        dense_grads[i] = sum(_materialise(u, leaves[i].shape, n_units) for u in us)
        del uses[i]
        continue
      acc = 0.0
      for a in range(len(us)):
        for b in range(a, len(us)):
          ua, ub = us[a], us[b]
          term = jnp.sum(
            _gram(ua.left_kind, ua.left, ub.left_kind, ub.left)
            * _gram("dense", ua.right, "dense", ub.right),
            axis=(1, 2),
          )
          acc = acc + (term if a == b else 2.0 * term)
      sq[i] = acc
    for i, g in dense_grads.items():
      sq[i] = jnp.sum(jnp.square(g.astype(_F32)).reshape(n_units, -1), axis=1)
      dense_grads[i] = g.reshape((n_units,) + leaves[i].shape)  # a bias of several feature axes

    # Group the squared norms by clip group (flat: one group).
    group_of = self._groups(params, len(leaves))
    n_groups = len(jax.tree.leaves(self.clip_norm))
    group_sq = [jnp.zeros((n_units,), _F32) for _ in range(n_groups)]
    for i, v in sq.items():
      group_sq[group_of[i]] = group_sq[group_of[i]] + v
    norm_list = [jnp.sqrt(jnp.maximum(v, 0.0)) for v in group_sq]
    norms = jax.tree.unflatten(jax.tree.structure(self.clip_norm), norm_list)
    keep, dropped, factors = self.clip_factors(loss, norms, mask)
    factor_list = jax.tree.leaves(factors)

    def kept(a):
      return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0)

    out: List[Any] = [None] * len(leaves)
    for i, g in dense_grads.items():
      c = factor_list[group_of[i]].astype(_F32)
      out[i] = jnp.tensordot(c, kept(g).astype(_F32), axes=1)

    def bookkeep(i: int):
      """sum_u c_u left_u^T right_u of weight i. A unit with factor 0 must add exactly
      0 even when its inputs are not finite (0 x inf is nan), so both sides of a
      dropped unit are zeroed; the zeroing of the right side fuses with its scaling.

      No conditional skips the zeroing when every input is finite: on a mesh each
      sum is reduced over the data axis inside the step, and XLA:CPU runs a
      collective inside a conditional on a blocking thread, which with more
      devices than threads can wait forever (an abort after its rendezvous times
      out; seen on 8 virtual devices on 2 cores)."""
      c = factor_list[group_of[i]].astype(_F32)
      total = jnp.zeros(matrix_of[i], _F32)
      for u in uses[i]:
        right = kept(u.right.astype(_F32) * c[:, None, None])
        if u.left_kind == "index":  # ids: finite, and a dropped unit adds rows of zeros
          ids = u.left.reshape(-1)
          total = total.at[ids].add(right.reshape(-1, right.shape[-1]), mode="drop")
        else:
          total = total + jnp.einsum(
            "uti,utj->ij", kept(u.left), right, preferred_element_type=_F32
          )
      return total.reshape(leaves[i].shape)

    for i in uses:
      out[i] = bookkeep(i)
    summed = jax.tree.unflatten(treedef, [o.astype(l.dtype) for o, l in zip(out, leaves)])
    return summed, self.unit_aux(loss, norms, mask, keep, dropped, aux)

  def rules(self, params: PyTree, batch: PyTree, *args) -> Dict[str, str]:
    """How each parameter's per-unit norm and clipped sum are computed, by path.

    "ghost" (Gram of inputs x Gram of output gradients), "materialised"
    (`x^T g` per unit from the taps: a bias, or a weight `materialise` picks,
    e.g. a small vocabulary's embedding) or "vmap" (no rule, or a use
    outside the intercepted layers). Traces the loss once; nothing is computed.

    Args:
      params: the parameters, as passed to the clipped-gradient function.
      batch: a batch of units.
      *args: the extra arguments of the loss.

    Returns:
      {parameter path: "ghost" | "materialised" | "vmap"}.
    """
    leaves, treedef = jax.tree.flatten(params)
    sites, _, group_size = self._plan(leaves, treedef, batch, args)
    rules = _rules(sites, leaves, group_size)
    paths = [
      jax.tree_util.keystr(p, simple=True, separator="/")
      for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    return {p: rules.get(i, "vmap") for i, p in enumerate(paths)}

  @property
  def _group(self) -> Optional[GroupMean]:
    return self._loss_fn if isinstance(self._loss_fn, GroupMean) else None

  def _traced_loss(self, params, unit, args):
    """(loss, aux) of the call the layers are traced in: the unit, or one example of a group."""
    group = self._group
    if group is None:
      return self.unit_loss(params, unit, args)
    out = group.example_loss(params, unit, *args)
    return out if group.has_aux else (out, None)

  def _groups(self, params, n_leaves: int) -> List[int]:
    """Clip-group index of every flat leaf of `params`."""
    if not self.per_layer:
      return [0] * n_leaves
    clip_def = jax.tree.structure(self.clip_norm)
    gid = jax.tree.unflatten(clip_def, list(range(clip_def.num_leaves)))
    per_leaf = jax.tree.map(lambda g, sub: jax.tree.map(lambda _: g, sub), gid, params)
    out = jax.tree.leaves(per_leaf)
    if len(out) != n_leaves:
      raise ValueError("the clip-norm tree must be a prefix of params")
    return out
