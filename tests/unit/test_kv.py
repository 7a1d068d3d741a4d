"""Direct tests of the KV-cache helpers both engines share (``wisp.kv``).

The engine tests check these end to end (losslessness); here each helper is pinned on its own,
with caches whose entries encode their position, so an off-by-one in padding, cropping or
copying back shows as a wrong number rather than as a rare token flip.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen3NextConfig
from wisp.kv import KVSession, PaddedBatch, SessionCache, crop_to, new_cache, padded_batch
from wisp.prefix import common_prefix_len

LAYERS, HEADS, DIM = 2, 2, 4
CPU = torch.device("cpu")


def _config() -> Qwen2Config:
    return Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=LAYERS,
                       num_attention_heads=2, num_key_value_heads=HEADS)


def _kv(positions: range, layer: int, tag: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-1 keys/values whose entry at position ``p`` is ``p + tag + 100 * layer`` (values
    negated), so every copied or cropped column can be checked by value."""
    col = torch.tensor([float(p) + tag + 100.0 * layer for p in positions])
    keys = col[None, None, :, None].expand(1, HEADS, len(positions), DIM).clone()
    return keys, -keys


def _filled(n: int, tag: float = 0.0) -> DynamicCache:
    """A cache holding ``n`` positions in every layer (see ``_kv``)."""
    cache = new_cache(_config())
    for layer in range(LAYERS):
        cache.update(*_kv(range(n), layer, tag), layer)
    return cache


def _column_tags(cache: DynamicCache, layer: int = 0, row: int = 0) -> list[float]:
    return cache.layers[layer].keys[row, 0, :, 0].tolist()


# -- common prefix ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [], 0),
        ([], [1], 0),
        ([1, 2, 3], [], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2], [1, 2, 3], 2),  # one is a prefix of the other, either way round
        ([1, 2, 3], [1, 2], 2),
        ([1, 2, 3], [1, 2, 4, 5], 2),
        ([7, 2, 3], [1, 2, 3], 0),  # differs at once even though the tails agree
        ((4, 5, 6), [4, 5, 9], 2),  # any sequences, not only lists
    ],
)
def test_common_prefix_len(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix_len(a, b) == n == common_prefix_len(b, a)


# -- crop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 6, 10])
def test_crop_to_keeps_the_first_positions(length: int) -> None:
    cache = _filled(10)
    crop_to(cache, length)  # a target length, not transformers 5's negative "tokens to drop"
    assert cache.get_seq_length() == length
    for layer in range(LAYERS):
        assert cache.layers[layer].keys.shape[-2] == cache.layers[layer].values.shape[-2] == length
        assert _column_tags(cache, layer) == [p + 100.0 * layer for p in range(length)]


@pytest.mark.parametrize("length", [-1, 11])
def test_crop_to_refuses_impossible_lengths(length: int) -> None:
    cache = _filled(10)
    with pytest.raises(ValueError, match="cannot crop"):
        crop_to(cache, length)
    assert cache.get_seq_length() == 10  # untouched


# -- new cache ----------------------------------------------------------------------------------


def test_new_cache_refuses_layers_that_cannot_be_rolled_back() -> None:
    assert new_cache(_config()).is_croppable
    linear = Qwen3NextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    with pytest.raises(NotImplementedError, match="rolled back"):
        new_cache(linear)
    with pytest.raises(NotImplementedError):
        SessionCache(linear, 4)


# -- padded batch -------------------------------------------------------------------------------


def test_padded_batch_aligns_rows_of_different_lengths() -> None:
    pasts = [3, 0, 5]
    news = [[11, 12], [21, 22, 23, 24], [31]]
    rows = [(_filled(p, tag=1000.0 * b), p, new) for b, (p, new) in enumerate(zip(pasts, news, strict=True))]
    batch = padded_batch(rows, pad_token_id=99, device=CPU)
    assert isinstance(batch, PaddedBatch)
    input_ids, mask, positions, past, max_past = batch  # unpacks like the 5-tuple callers use
    assert max_past == 5
    # new ids right-padded with the pad id
    assert input_ids.tolist() == [[11, 12, 99, 99], [21, 22, 23, 24], [31, 99, 99, 99]]
    # [0 x (P - P_r) | 1 x P_r | 1 x L_r | 0 x (L - L_r)]
    assert mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
    ]
    # true positions, continuing past the real ids into the padding
    assert positions.tolist() == [[3, 4, 5, 6], [0, 1, 2, 3], [5, 6, 7, 8]]
    # past KV left-padded with zeros, so every row's first new id sits at column max_past
    assert past.get_seq_length() == max_past
    for layer in range(LAYERS):
        keys, values = past.layers[layer].keys, past.layers[layer].values
        assert keys.shape == values.shape == (3, HEADS, max_past, DIM)
        for b, p in enumerate(pasts):
            want = [0.0] * (max_past - p) + [q + 1000.0 * b + 100.0 * layer for q in range(p)]
            assert keys[b, 0, :, 0].tolist() == want
            assert values[b, 1, :, 3].tolist() == [-w if w else 0.0 for w in want]


def test_padded_batch_leaves_session_caches_alone() -> None:
    cache = _filled(4)
    _, _, _, past, _ = padded_batch([(cache, 4, [1]), (_filled(2), 2, [1, 2])], 0, CPU)
    past.layers[0].keys.fill_(7.0)  # the batch owns its copy
    assert _column_tags(cache) == [0.0, 1.0, 2.0, 3.0]


def test_padded_batch_without_any_past_has_an_empty_cache() -> None:
    input_ids, mask, positions, past, max_past = padded_batch(
        [(new_cache(_config()), 0, [5, 6]), (new_cache(_config()), 0, [7])], 0, CPU)
    assert max_past == 0 and past.get_seq_length() == 0
    assert input_ids.tolist() == [[5, 6], [7, 0]]
    assert mask.tolist() == [[1, 1], [1, 0]]
    assert positions.tolist() == [[0, 1], [0, 1]]


# -- a session's cache --------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [slice(3, 5), torch.tensor([3, 4])])
def test_extend_appends_only_the_given_columns_of_one_row(cols: slice | torch.Tensor) -> None:
    session = KVSession(cache=_filled(2, tag=500.0), ids=[1, 2])
    batch = padded_batch([(_filled(3), 3, [7, 8, 9]), (_filled(1, tag=1000.0), 1, [5, 6])], 0, CPU)
    for layer in range(LAYERS):  # what the forward would write: new KV at columns 3.. of each row
        k, v = _kv(range(3, 6), layer, 2000.0)
        batch.past.update(torch.cat([k, k + 1000.0]), torch.cat([v, v - 1000.0]), layer)
    session.extend(batch.past, 1, cols, [5, 6])
    assert session.ids == [1, 2, 5, 6]
    assert session.cache.get_seq_length() == 4
    for layer in range(LAYERS):
        base = 100.0 * layer
        assert _column_tags(session.cache, layer) == [500 + base, 501 + base, 3003 + base, 3004 + base]


# -- the LRU ------------------------------------------------------------------------------------


def test_session_cache_refuses_no_capacity() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        SessionCache(_config(), 0)


def test_session_cache_evicts_least_recently_used_first() -> None:
    lru = SessionCache(_config(), 3)
    for sid in "abc":
        lru.session(sid).ids.append(ord(sid))
    assert list(lru.lengths()) == ["a", "b", "c"] and len(lru) == 3
    lru.session("a")  # a use moves "a" to the most recently used end
    assert list(lru.lengths()) == ["b", "c", "a"]
    assert lru["b"].ids == [ord("b")]  # a look-up by index is not a use
    lru.session("d")
    assert list(lru.lengths()) == ["c", "a", "d"] and "b" not in lru and len(lru) == 3
    lru.session("e")
    lru.session("f")
    assert list(lru.lengths()) == ["d", "e", "f"]  # never more than max_sessions
    # a known session comes back as the same object, an evicted one starts empty
    assert lru.session("f") is lru["f"]
    assert lru.session("a").ids == [] and lru.lengths() == {"e": 0, "f": 0, "a": 0}
    with pytest.raises(KeyError):
        lru["b"]


def test_session_cache_drop() -> None:
    lru = SessionCache(_config(), 2)
    lru.session("a")
    lru.drop("a")
    lru.drop("never-seen")  # no-op
    assert lru.lengths() == {} and "a" not in lru


def test_session_cache_lengths_count_cached_ids() -> None:
    lru = SessionCache(_config(), 2)
    lru.session("a").ids.extend([1, 2, 3])
    lru.session("b")
    assert lru.lengths() == {"a": 3, "b": 0}


def _cached(lru: SessionCache, sid: str, ids: list[int]) -> KVSession:
    entry = lru.session(sid)
    entry.cache, entry.ids = _filled(len(ids)), list(ids)
    return entry


def test_rewind_crops_cache_and_ids_together() -> None:
    lru = SessionCache(_config(), 2)
    entry = _cached(lru, "s", [5, 6, 7, 8])
    lru.rewind(entry, 2)
    assert entry.ids == [5, 6] and _column_tags(entry.cache) == [0.0, 1.0]
    old = entry.cache
    lru.rewind(entry, 0)  # nothing reusable: a fresh cache, not a zero-length crop
    assert entry.ids == [] and entry.cache is not old and entry.cache.get_seq_length() == 0


@pytest.mark.parametrize(
    ("committed", "keep"),
    [
        ([5, 6, 7, 8, 9], 4),  # all cached ids reused, the new id is fed
        ([5, 6, 7, 8], 3),  # all committed ids cached: the last one is still fed (its logits)
        ([5, 6, 7], 2),  # shorter than the cache (a rolled-back draft)
        ([5, 6, 0, 8, 9], 2),  # diverges: rolled back to the common prefix
        ([0, 6, 7], 0),
        ([5], 0),
    ],
)
def test_reuse_keeps_the_common_prefix_but_always_feeds_the_last_id(
    committed: list[int], keep: int
) -> None:
    lru = SessionCache(_config(), 2)
    entry = _cached(lru, "s", [5, 6, 7, 8])
    assert lru.reuse(entry, committed) == keep
    assert entry.ids == committed[:keep] and entry.cache.get_seq_length() == keep


def test_clone_copies_cache_and_ids_and_protects_the_source() -> None:
    lru = SessionCache(_config(), 3)
    src = _cached(lru, "src", [1, 2, 3])
    lru.session("x")
    assert lru.clone("src", "dst")
    assert list(lru.lengths()) == ["x", "dst", "src"]  # the source ends most recently used
    dst = lru["dst"]
    assert dst.ids == [1, 2, 3] and _column_tags(dst.cache) == [0.0, 1.0, 2.0]
    dst.ids.append(4)
    dst.cache.layers[0].keys.fill_(9.0)
    assert src.ids == [1, 2, 3] and _column_tags(src.cache) == [0.0, 1.0, 2.0]  # a deep copy
    assert not lru.clone("unknown", "dst2") and "dst2" not in lru
