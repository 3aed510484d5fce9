"""Suite-wide pytest settings."""

import pytest

# The longest tests start first, so that two xdist workers (`make test`) do not end with one of them
# alone on a long test collected last (test_trainer.py sorts after every other file). A long test
# carries `@pytest.mark.start_early(N)` (N = 1 starts first; measured on the 2-core CI machine);
# the marker stays with the test through a rename. The rest keep their collection order.
START_EARLY = "start_early"


def pytest_collection_modifyitems(config, items):
    """Reorder: the start_early tests by their N, then the others as collected."""

    def rank(item):
        marker = item.get_closest_marker(START_EARLY)
        return marker.args[0] if marker is not None else float("inf")

    items[:] = sorted(items, key=rank)  # stable: ties keep collection order


def pytest_configure(config):
    """Refuse `--dist loadgroup` under pytest 9.2+ with pytest-xdist 3.8 or older, which lose the
    groups silently (xdist marks a group in the node id, which pytest 9.2 no longer lets it
    change): the many_ranks and cluster groups would then run on both workers at once, each
    growing a four-rank pool or launching torchrun, and the suite would take far longer."""
    from importlib.metadata import version

    if config.getoption("dist", default="no") != "loadgroup":
        return
    pytest_version = tuple(int(part) for part in version("pytest").split(".")[:2])
    xdist_version = tuple(int(part) for part in version("pytest-xdist").split(".")[:2])
    if pytest_version >= (9, 2) and xdist_version <= (3, 8):
        raise pytest.UsageError(f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} ignores "
                                "xdist_group under --dist loadgroup: install pyproject's test extra (pytest<9.2)")
