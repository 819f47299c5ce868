import os

import pytest
import torch

# ASG_TEST_THREADS=1 keeps the suite from fighting another job for the cores (two thread pools
# on two cores each spin-wait for the other and run many times slower)
torch.set_num_threads(int(os.environ.get("ASG_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One SynDigits render cache for the whole test session, holding the tiny envs' digits
    from the start, so that no test's output depends on whether an earlier one rendered them."""
    from asg_env.tasks.syndigits import load_syndigits

    path = str(tmp_path_factory.mktemp("syndigits-cache"))
    load_syndigits(path, 160 + 8 + 40, 32, 0)  # tiny_env_kwargs / TINY: source, held-out batch, synthetic eval
    return path


@pytest.fixture(autouse=True)
def isolated_cache(cache_dir, monkeypatch):
    """Disk caches (teacher logits) go to the session's temp folder, never to ~/.cache."""
    monkeypatch.setenv("ASG_CACHE", cache_dir)


@pytest.fixture
def one_thread():
    """For tests that compare two runs bit for bit: torch's two-thread CPU kernels are not
    (a 2-round adaptation and its kill/resume differed in the last bits, |Δ| ≤ 2.4e-7, in 4 of 5 tries)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_env_kwargs(cache_dir):
    """SynDigits-v0 at a size that steps in tens of milliseconds."""
    return dict(
        data_root=cache_dir, source_size=160, target_eval_size=60, batch_size=8,
        image_size=32, episode_steps=4, lr_base=0.02, synthetic_eval_size=40, imagenet_photos=4,
    )
