"""Optional CUDA backend (Numba CUDA, package ``numba-cuda``): ``pip install 'pocketlm[cuda]'``.

Selected with ``LLM.load(..., device="cuda")`` (see ``pocketlm.nn.backend``). ``kernels`` holds the
device kernels, ``ops`` the device arrays and nn building blocks, ``model`` the upload of a
model, its device KV cache and streamed experts. Importing this package imports
``numba.cuda``; it also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""
