import torch

from visiontune.engine.order import DataOrder, group_by_length


def test_each_epoch_is_a_permutation_and_resume_skips_exactly() -> None:
    order = DataOrder(list(range(10)), micro_batch_size=3, seed=1)
    assert order.batches_per_epoch == 4
    epoch0 = list(order.epoch_batches(0))
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    assert [len(b) for b in epoch0] == [3, 3, 3, 1]
    assert list(order.epoch_batches(0, start=2)) == epoch0[2:]
    assert list(order.epoch_batches(1)) != epoch0


def test_subset_indices_and_overfit_limit_repeat_the_same_batches() -> None:
    order = DataOrder([5, 7, 9, 11], micro_batch_size=2, seed=0, limit_batches=1)
    assert order.batches_per_epoch == 1
    first = list(order.epoch_batches(0))
    assert first == list(order.epoch_batches(3))
    assert set(first[0]) <= {5, 7, 9, 11}


def test_group_by_length_pairs_similar_lengths_within_spans() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    batches = group_by_length(list(range(8)), lengths, 2, torch.Generator().manual_seed(0), 2)
    # spans of 4 samples: [0..3] pairs {2, 0} and {3, 1}; [4..7] pairs {6, 4} and {7, 5}
    assert sorted(sorted(b) for b in batches) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert batches[0] == [2, 0]  # the longest sample (9) comes first


def length_grouped(seed: int, epoch: int) -> tuple[list[list[int]], list[int]]:
    """Four spans of 50 micro-batches of 2 samples with random lengths."""
    lengths = torch.randint(1, 1000, (400,), generator=torch.Generator().manual_seed(7)).tolist()
    order = DataOrder(list(range(400)), 2, seed=seed, lengths=lengths)
    return list(order.epoch_batches(epoch)), lengths


def test_length_grouped_spans_are_not_a_long_to_short_curriculum() -> None:
    batches, lengths = length_grouped(seed=0, epoch=0)
    for span in range(4):
        longest = [max(lengths[i] for i in b) for b in batches[span * 50 : (span + 1) * 50]]
        assert longest != sorted(longest, reverse=True), f"span {span} is sorted longest-first"
        assert longest != sorted(longest), f"span {span} is sorted shortest-first"


def test_length_grouped_epoch_starts_with_the_longest_batch_and_is_exact_on_resume() -> None:
    for epoch in range(3):
        batches, lengths = length_grouped(seed=3, epoch=epoch)
        assert max(lengths) in [lengths[i] for i in batches[0]]
        assert sorted(i for b in batches for i in b) == list(range(400))
        assert all(len(b) == 2 for b in batches)
        assert length_grouped(seed=3, epoch=epoch)[0] == batches
    assert length_grouped(seed=3, epoch=0)[0] != length_grouped(seed=3, epoch=1)[0]
    order = DataOrder(list(range(400)), 2, seed=3, lengths=lengths)
    assert list(order.epoch_batches(1, start=17)) == length_grouped(seed=3, epoch=1)[0][17:]


def test_length_grouping_keeps_a_short_last_batch_and_every_sample() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8]
    order = DataOrder(list(range(7)), 2, seed=0, lengths=lengths)
    batches = list(order.epoch_batches(0))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert sorted(len(b) for b in batches) == [1, 2, 2, 2]
    assert batches == list(order.epoch_batches(0))
