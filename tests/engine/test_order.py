from visiontune.engine.order import DataOrder


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
