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


def test_group_by_length_sorts_within_spans_and_keeps_every_sample() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    grouped = group_by_length(list(range(8)), lengths, micro_batch_size=2, window=2)
    assert grouped == [2, 0, 3, 1, 6, 4, 7, 5]  # spans of 4: [0..3] and [4..7], longest first
    order = DataOrder(list(range(8)), 2, seed=0, lengths=lengths)
    batches = list(order.epoch_batches(0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches == list(order.epoch_batches(0))
