import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's
# interpreter. It is read when the kernels are first decorated, so set it
# before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
