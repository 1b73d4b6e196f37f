import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be switched on
    # before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
