"""Blockwise attention: FlashAttention-2 (Dao 2023) in pure JAX, `attention="blockwise"`.

Queries in blocks of `block_q`, each visiting only the key blocks of `block_k` that its causal
mask and sliding window can reach (work O(t * window), not O(t^2)); a softmax kept online over
them; no [t, t] array in the forward or the backward pass, which is a custom VJP recomputing
each block's scores from q, k, v and the saved log-sum-exp. Blocks that padding or packed
documents mask completely are skipped too, at run time. Grouped-query attention reads each kv
head once for its group. A query that sees no key at all (left padding) gets the plain average
of all values, as the materialized scores (and transformers' eager attention) give it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mistral_jax.nn.masking import Masking, pad_to_blocks, per_device
from mistral_jax.parallel.sharding import platform

# Block sizes ((queries, keys) of the forward pass, of the backward pass) by backend. On a CPU
# (2 cores, AVX-512, 8k tokens): forward + backward of one layer took 1.66 s with these, 1.74 s
# with 256 everywhere, 2.34 s with 512 everywhere (the backward's products and transposes at
# 512 x 512 x 4 heads overflow the core's cache), 2.88 s with 128 everywhere.
BLOCKS = {"cpu": ((512, 512), (256, 256)), "gpu": ((128, 128), (128, 128)),
          "tpu": ((512, 512), (512, 512))}
NEG = -1e30  # the score of a masked pair: finite, so a row with nothing allowed is not NaN


def blockwise(q, k, v, masking: Masking, blocks=None):
    """Flash attention over q [b, t, n, h], k / v [b, t, kv, h]; out [b, t, n, h]. `blocks`:
    (query block, key block) for both passes, or ((forward q, k), (backward q, k)); default:
    the backend's."""
    blocks = block_sizes(blocks, platform())
    return per_device(partial(_blockwise_local, window=masking.window, blocks=blocks),
                      q, k, v, masking)


def block_sizes(blocks, platform: str):
    """((forward q, k), (backward q, k)) from `blocks` as `blockwise` takes it."""
    blocks = blocks or BLOCKS.get(platform, BLOCKS["cpu"])
    return (tuple(blocks), tuple(blocks)) if isinstance(blocks[0], int) else blocks


def _blockwise_local(q, k, v, valid, segments, *, window, blocks):
    b, t, n, h = q.shape
    kv = k.shape[2]
    blocks = tuple(tuple(min(size, t) for size in pair) for pair in blocks)
    q, k, v, valid, segments = pad_to_blocks(math.lcm(*blocks[0], *blocks[1]), q, k, v, valid,
                                             segments)
    padded = q.shape[1]
    # grouped layout: [b, kv, t, g, h] for queries, [b, kv, t, h] for keys and values
    qg = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, padded, kv, n // kv, h)
    qg = qg.transpose(0, 2, 1, 3, 4)
    kg, vg = (a.transpose(0, 2, 1, 3) for a in (k, v))
    if platform() == "cpu":  # XLA:CPU's fast matmuls are float32 ones
        qg, kg, vg = (a.astype(jnp.float32) for a in (qg, kg, vg))
    out, lse = _flash(qg, kg, vg, valid.astype(bool), segments.astype(jnp.int32), window,
                      *blocks)
    # A query that sees no key (left padding) gets the plain average of every value, as the
    # materialized scores and transformers give it: its logits then predict the first real token
    # as theirs do, so a left-padded batch's loss is theirs.
    nothing = (lse[:, :, :t] < NEG / 2)[..., None]
    average = jnp.mean(vg[:, :, :t], axis=2, dtype=jnp.float32)[:, :, None, None]
    out = jnp.where(nothing, average.astype(out.dtype), out[:, :, :t])
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


class _Blocks(NamedTuple):
    """The static block layout of one call, and the masks of a block pair."""

    t: int
    block_q: int
    block_k: int
    window: int | None

    def key_range(self, i):
        """[lo, hi) of the key blocks query block `i` can reach (causal, window)."""
        qs = i * self.block_q
        hi = jnp.minimum((qs + self.block_q - 1) // self.block_k + 1, self.t // self.block_k)
        if self.window is None:
            return 0, hi
        return jnp.maximum(qs - (self.window - 1), 0) // self.block_k, hi

    def allowed(self, qs, ks, valid_k, seg_q, seg_k):
        """[b, block_q, block_k]: which pairs of the block at (qs, ks) see each other."""
        i = qs + jnp.arange(self.block_q)[:, None]
        j = ks + jnp.arange(self.block_k)[None, :]
        ok = j <= i
        if self.window is not None:
            ok &= i - j < self.window
        return ok[None] & valid_k[:, None, :] & (seg_q[:, :, None] == seg_k[:, None, :])


def _summaries(valid, segments, block: int):
    """Per block and row: whether any token is real, and the smallest / largest segment id of
    its real tokens, so a block pair no document spans can be skipped."""
    b, t = valid.shape
    v = valid.reshape(b, t // block, block)
    s = segments.reshape(b, t // block, block)
    big = jnp.iinfo(jnp.int32).max
    return (v.any(-1), jnp.where(v, s, big).min(-1), jnp.where(v, s, -big).max(-1))


def _overlap(q_sum, k_sum, i, j):
    """Can any query of block `i` see any key of block `j`, for some row? (documents only;
    causality and the window are in the loop bounds)."""
    q_any, q_lo, q_hi = (a[:, i] for a in q_sum)
    k_any, k_lo, k_hi = (a[:, j] for a in k_sum)
    return jnp.any(q_any & k_any & (q_lo <= k_hi) & (k_lo <= q_hi))


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _scores(blocks: _Blocks, qb, kb, qs, ks, valid, segments, seg_q):
    """[b, kv, bq, g, bk] float32 scores of a block pair, NEG where the pair is masked."""
    s = jnp.einsum("bkqgh,bksh->bkqgs", qb, kb, preferred_element_type=jnp.float32)
    ok = blocks.allowed(qs, ks, _slice(valid, ks, blocks.block_k, 1), seg_q,
                        _slice(segments, ks, blocks.block_k, 1))
    return jnp.where(ok[:, None, :, None, :], s, NEG)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, valid, segments, window, forward, backward):
    """(out, log-sum-exp: NEG for a query that sees no key; not differentiated). `forward` /
    `backward`: the (query, key) block sizes of each pass."""
    return _flash_forward(q, k, v, valid, segments, window, *forward)


def _flash_forward(q, k, v, valid, segments, window, block_q, block_k):
    """(out [b, kv, t, g, h] in v's dtype, log-sum-exp [b, kv, t, g] float32)."""
    b, kv, t, g, h = q.shape
    blocks = _Blocks(t, block_q, block_k, window)
    q_sum, k_sum = _summaries(valid, segments, block_q), _summaries(valid, segments, block_k)

    def query_block(i, carry):
        out, lse = carry
        qs = i * block_q
        qb, seg_q = _slice(q, qs, block_q, 2), _slice(segments, qs, block_q, 1)

        def key_block(j, state):
            def visit(state):
                m, total, acc = state
                ks = j * block_k
                s = _scores(blocks, qb, _slice(k, ks, block_k, 2), qs, ks, valid, segments,
                            seg_q)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                scale = jnp.exp(m - m_new)
                pv = jnp.einsum("bkqgs,bksh->bkqgh", p.astype(v.dtype),
                                _slice(v, ks, block_k, 2), preferred_element_type=jnp.float32)
                return m_new, total * scale + p.sum(-1), acc * scale[..., None] + pv

            return jax.lax.cond(_overlap(q_sum, k_sum, i, j), visit, lambda s: s, state)

        shape = (b, kv, block_q, g)
        init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, h), jnp.float32))
        lo, hi = blocks.key_range(i)
        m, total, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        safe = jnp.maximum(total, 1e-30)  # nothing visited (all skipped): out 0
        block_out = (acc / safe[..., None]).astype(v.dtype)
        out = jax.lax.dynamic_update_slice_in_dim(out, block_out, qs, axis=2)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(safe), qs, axis=2)
        return out, lse

    init = (jnp.zeros(q.shape, v.dtype), jnp.zeros((b, kv, t, g), jnp.float32))
    return jax.lax.fori_loop(0, t // block_q, query_block, init)


def _flash_fwd(q, k, v, valid, segments, window, forward, backward):
    out, lse = _flash_forward(q, k, v, valid, segments, window, *forward)
    return (out, lse), (q, k, v, valid, segments, out, lse)


def _flash_bwd(window, forward, backward, residuals, cotangents):
    """FlashAttention-2's backward: per block pair, the probabilities from the saved
    log-sum-exp; dq accumulated per query block, dk and dv into the whole arrays."""
    q, k, v, valid, segments, out, lse = residuals
    d_out = cotangents[0]
    b, kv, t, g, h = q.shape
    block_q, block_k = backward
    blocks = _Blocks(t, block_q, block_k, window)
    q_sum, k_sum = _summaries(valid, segments, block_q), _summaries(valid, segments, block_k)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b,kv,t,g]

    rows, f32 = (b, kv, block_q * g, block_k), jnp.float32

    def query_block(i, carry):
        dq, dk, dv = carry
        qs = i * block_q
        qb, seg_q = _slice(q, qs, block_q, 2), _slice(segments, qs, block_q, 1)
        dob = _slice(d_out, qs, block_q, 2)
        lse_b, delta_b = _slice(lse, qs, block_q, 2), _slice(delta, qs, block_q, 2)

        def key_block(j, state):
            def visit(state):
                dq_b, dk, dv = state
                ks = j * block_k
                kb, vb = _slice(k, ks, block_k, 2), _slice(v, ks, block_k, 2)
                q_rows, do_rows = qb.reshape(*rows[:3], h), dob.reshape(*rows[:3], h)
                s = _scores(blocks, qb, kb, qs, ks, valid, segments, seg_q)
                p = jnp.exp(s - lse_b[..., None]).reshape(rows)  # [b, kv, bq * g, bk]
                dp = jnp.einsum("bkrh,bksh->bkrs", do_rows, vb, preferred_element_type=f32)
                ds = p * (dp - delta_b.reshape(rows[:3])[..., None])
                dq_b = dq_b + jnp.einsum("bkrs,bksh->bkrh", ds.astype(kb.dtype), kb,
                                         preferred_element_type=f32).reshape(dq_b.shape)
                # dv and dk contract over the rows, so they take the keys-major [bk, rows]
                # products: p transposed (a plain copy), and dp^T from its own matmul. A
                # transposed ds, which XLA recomputes in the transposed order, was 10x slower.
                pt = jnp.swapaxes(p, 2, 3)
                dv_b = jnp.einsum("bksr,bkrh->bksh", pt.astype(dob.dtype), do_rows,
                                  preferred_element_type=f32)
                dpt = jnp.einsum("bksh,bkrh->bksr", vb, do_rows, preferred_element_type=f32)
                dst = pt * (dpt - delta_b.reshape(rows[:3])[:, :, None, :])
                dk_b = jnp.einsum("bksr,bkrh->bksh", dst.astype(qb.dtype), q_rows,
                                  preferred_element_type=f32)
                dk = jax.lax.dynamic_update_slice_in_dim(
                    dk, _slice(dk, ks, block_k, 2) + dk_b, ks, axis=2)
                dv = jax.lax.dynamic_update_slice_in_dim(
                    dv, _slice(dv, ks, block_k, 2) + dv_b, ks, axis=2)
                return dq_b, dk, dv

            return jax.lax.cond(_overlap(q_sum, k_sum, i, j), visit, lambda s: s, state)

        lo, hi = blocks.key_range(i)
        dq_b, dk, dv = jax.lax.fori_loop(
            lo, hi, key_block, (jnp.zeros(qb.shape, jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_b, qs, axis=2), dk, dv

    init = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    dq, dk, dv = jax.lax.fori_loop(0, t // block_q, query_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
