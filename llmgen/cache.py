"""A key/value cache written in place, so each decode step computes one new position only.

The buffers hold ``capacity`` positions and are written in place; a step never
allocates or concatenates, except when the run outgrows them: then they double, up to
``max_len`` (the prompt plus the most new tokens). Starting small matters because a
chat reply may run to the end of the context: Qwen3's 40k positions would be 9 GB
reserved up front for a reply of a few hundred tokens. Every allocation is checked
against the free memory first, so a size that cannot fit is an error saying so, not an
allocator's crash. Every row of a batch shares one write position (``length``): prompts
of different lengths are left-padded, and ``key_mask`` marks the padding slots that no
query may attend to.
"""

from __future__ import annotations

import torch

from llmgen.errors import LlmgenError

FIRST_CAPACITY = 256  # positions beyond the first write reserved at once


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.shape = (n_layers, batch, n_kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_len = max_len
        self.length = 0
        self.k = torch.zeros(self.shape, dtype=dtype, device=device)
        self.v = self.k
        self.key_mask: torch.Tensor | None = None  # [batch, capacity] bool, None = no padding

    # The buffers are (layers, batch, kv heads, capacity, head size); each layer's slice is
    # taken once whenever a buffer is replaced, not at every write of every step.
    @property
    def k(self) -> torch.Tensor:
        return self._k

    @k.setter
    def k(self, buffer: torch.Tensor) -> None:
        self._k, self._k_layers = buffer, buffer.unbind(0)

    @property
    def v(self) -> torch.Tensor:
        return self._v

    @v.setter
    def v(self, buffer: torch.Tensor) -> None:
        self._v, self._v_layers = buffer, buffer.unbind(0)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` slots in all: the buffers grow (at least doubling, at
        most to ``max_len``), keeping what they hold."""
        if positions <= self.capacity:
            return
        if positions > self.max_len:
            raise ValueError(f"KV cache full: {positions} positions > {self.max_len}")
        size = min(self.max_len, max(positions + FIRST_CAPACITY * (self.capacity == 0), 2 * self.capacity))
        n_layers, batch, heads, _, head_dim = self.k.shape
        check_room(2 * n_layers * batch * heads * size * head_dim * self.k.element_size(), self.device, batch, size)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros((n_layers, batch, heads, size, head_dim), dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)
        if self.key_mask is not None:
            grown = torch.ones(batch, size, dtype=torch.bool, device=self.key_mask.device)
            grown[:, : self.key_mask.shape[1]] = self.key_mask
            self.key_mask = grown

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Record which prompt slots are real tokens (1) and which are left padding (0)."""
        if bool(attention_mask.all()):
            self.key_mask = None
            return
        self.reserve(attention_mask.shape[1])
        mask = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=self.k.device)
        mask[:, : attention_mask.shape[1]] = attention_mask.bool()
        self.key_mask = mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values at the current position; return all keys so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        keys, values = self._k_layers[layer], self._v_layers[layer]  # (B, kv, capacity, hs)
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def attention_mask(self, q_len: int) -> torch.Tensor | None:
        """Boolean ``[batch, 1, q_len, keys]`` mask (True = may attend), or None if all may.

        Queries occupy slots ``[length, length + q_len)``: each sees itself, the slots
        before it, and no padding.
        """
        start, end = self.length, self.length + q_len
        if q_len == 1 and self.key_mask is None:
            return None
        q_pos = torch.arange(start, end, device=self.k.device)[:, None]
        k_pos = torch.arange(end, device=self.k.device)[None, :]
        mask = (k_pos <= q_pos)[None, None]
        if self.key_mask is not None:
            # A padding query still sees itself, so its softmax row is never empty (NaN).
            mask = (mask & self.key_mask[:, None, None, :end]) | (k_pos == q_pos)
        return mask

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the rows named by ``rows`` (with repeats), in a new buffer of ``len(rows)``
        rows: how a batch drops finished rows, or one prefilled row becomes a beam's K."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, rows)

    def follow(self, parents: list[int]) -> None:
        """Beam search's step: row ``i`` continues from row ``parents[i]``.

        Copies in place only the rows whose parent is another row, and only their filled
        slots. ``reorder`` gathers the whole buffer, every row and every slot of its
        capacity, which measured 2 ms a step on GPT-2-124M: a sixth of what a beam step
        costs beyond a greedy one. Most steps move one or two rows, some none."""
        moved = [(row, parent) for row, parent in enumerate(parents) if parent != row]
        n = self.length
        overwritten = {row for row, _ in moved}
        # A parent that is itself overwritten this step (a swap) is read before it is.
        saved = {p: (self.k[:, p, :, :n].clone(), self.v[:, p, :, :n].clone()) for _, p in moved if p in overwritten}
        for row, parent in moved:
            k, v = saved.get(parent) or (self.k[:, parent, :, :n], self.v[:, parent, :, :n])
            self.k[:, row, :, :n].copy_(k)
            self.v[:, row, :, :n].copy_(v)
        if moved and self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, torch.tensor(parents, device=self.key_mask.device))


def check_rows(model, rows: int, prompt: int, new: int) -> None:
    """Before a decoder builds anything per row (seeds, beams, logits): refuse ``rows``
    sequences of a ``prompt``-token prompt and up to ``new`` tokens at once when their
    first cache allocation and per-step logits cannot fit,
    saying how many would. A million samples once meant minutes of building lists, then
    an allocator's crash."""
    probe = model.new_cache(1, 1)
    positions = prompt + min(new, FIRST_CAPACITY)
    n_layers, _, heads, _, head_dim = probe.k.shape
    per_row = 2 * n_layers * heads * head_dim * probe.k.element_size() * positions
    per_row += 4 * 4 * model.cfg.vocab_size  # float32 logits, log-probs, probabilities and a sort, per row
    free = free_memory(probe.device)
    if free is not None and rows * per_row > free:
        gib = 1024**3
        raise LlmgenError(f"{rows:,} sequences at once need {rows * per_row / gib:.1f} GiB for their cache and logits, "
                          f"and {free / gib:.1f} GiB is free: at most {free // per_row:,} fit")


def check_room(size: int, device: torch.device, rows: int, positions: int) -> None:
    """Refuse to allocate ``size`` bytes of cache that the device cannot hold."""
    free = free_memory(device)
    if free is not None and size > free:
        gib = 1024**3
        raise LlmgenError(f"the KV cache for {rows:,} rows x {positions:,} positions needs {size / gib:.1f} GiB, "
                          f"and {free / gib:.1f} GiB is free: fewer samples, a narrower beam, or a smaller -n fit")


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def pad(seqs: list[list[int]], left: bool, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths as one ``[B, T]`` tensor and its mask (1 = token).

    Left padding for generation from a cache, so every row's next token lands in the
    same slot; right padding where there is no cache (training, exact search)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token, padding clamped to 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Without a cache (training, exact search): [B, 1, T, T] bool, causal, no padding
    keys; each position always sees itself so no softmax row is empty."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & attention_mask.bool()[:, None, None, :]) | eye


def positions_and_mask(
    input_ids: torch.Tensor,
    positions: torch.Tensor | None,
    cache: KVCache | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every model's forward needs besides the ids: position ids (counted on from
    the cache's write position when not given) and the attention mask, or None when
    plain causal attention will do."""
    T = input_ids.shape[1]
    if positions is None:
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=input_ids.device)[None]
    if cache is not None:
        return positions, cache.attention_mask(T)
    if attention_mask is not None:
        return positions, padded_causal_mask(attention_mask)
    return positions, None
