"""Load a cubin and launch it through the CUDA driver API (ctypes on libcuda): no Triton, no compiler, no cache.

A compiled Triton kernel is a cubin plus a launch descriptor: entry name, warps, dynamic shared memory, whether
it is a programmatic dependent launch, and its parameter list. Its parameters are the kernel's runtime arguments
minus those specialized to the constant 1, then the scratch pointers Triton appends (null: our kernels use none;
the packager refuses a kernel that would need one). Launches go on torch's current stream, so they order with
torch's work and are captured by CUDA graphs like any other launch.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

_SHARED_SIZE_BYTES = 1  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_CACHE_PREFER_SHARED = 2  # CU_FUNC_CACHE_PREFER_SHARED
_SHARED_OPTIN = 97  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_STATIC_SHARED_LIMIT = 49152
_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT


class CudaError(RuntimeError):
    pass


class _LaunchAttributeValue(ctypes.Union):  # CUlaunchAttributeValue: 64 bytes; the one member we set
    # c_ubyte, not c_char: ctypes hands a c_char array field out as a bytes copy, and writing through that
    # would write into an immutable (possibly shared) Python object.
    _fields_ = [("programmaticStreamSerializationAllowed", ctypes.c_int), ("raw", ctypes.c_ubyte * 64)]


class CuLaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an enum id, padding to 8, the value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_ubyte * 4), ("value", _LaunchAttributeValue)]


def pdl_attributes() -> ctypes.Array:
    """The launch attribute list of a programmatic dependent launch (the kernel may start before the previous
    one on the stream finishes; it waits where it calls griddepcontrol.wait)."""
    attr = CuLaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.programmaticStreamSerializationAllowed = 1
    return (CuLaunchAttribute * 1)(attr)


class CuLaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(CuLaunchAttribute)), ("numAttrs", ctypes.c_uint),
    ]  # fmt: skip


@functools.cache
def _cuda() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaError(f"cannot load the CUDA driver (libcuda.so.1): {e}") from None
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _cuda().cuGetErrorName(result, ctypes.byref(name))
        message = ctypes.c_char_p()
        _cuda().cuGetErrorString(result, ctypes.byref(message))
        text = (message.value or b"").decode()
        raise CudaError(f"{what} failed: {(name.value or b'?').decode()} ({result}): {text}")


def driver_version() -> int:
    """The CUDA version the driver supports, e.g. 12080 for 12.8."""
    v = ctypes.c_int()
    _check(_cuda().cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
    return v.value


def _make_current(index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread, without synchronizing
    anything (a first launch may happen while a CUDA graph is being captured)."""
    cuda = _cuda()
    ctx = ctypes.c_void_p()
    _check(cuda.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    device = ctypes.c_int()
    if ctx.value:
        _check(cuda.cuCtxGetDevice(ctypes.byref(device)), "cuCtxGetDevice")
        if device.value == index:
            return
    _check(cuda.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
    _check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class Kernel:
    """One cubin loaded into a device's context, launched for arguments its ``spec`` accepts."""

    def __init__(self, image: bytes, descriptor: dict, device: torch.device, spec) -> None:
        cuda = _cuda()
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device_index = index
        with torch.cuda.device(index):
            _make_current(index)
            self._image = ctypes.create_string_buffer(image, len(image))
            self.module = ctypes.c_void_p()
            _check(cuda.cuModuleLoadData(ctypes.byref(self.module), self._image), "loading a cubin (cuModuleLoadData)")
            self.function = ctypes.c_void_p()
            entry = descriptor["name"].encode()
            _check(cuda.cuModuleGetFunction(ctypes.byref(self.function), self.module, entry), "cuModuleGetFunction")
            self.shared = int(descriptor["shared"])
            if self.shared > _STATIC_SHARED_LIMIT:
                optin, static = ctypes.c_int(), ctypes.c_int()
                _check(cuda.cuDeviceGetAttribute(ctypes.byref(optin), _SHARED_OPTIN, index), "cuDeviceGetAttribute")
                if self.shared > optin.value:
                    raise CudaError(
                        f"kernel {descriptor['name']} needs {self.shared} bytes of shared memory; "
                        f"this GPU allows {optin.value} per block"
                    )
                _check(cuda.cuFuncSetCacheConfig(self.function, _CACHE_PREFER_SHARED), "cuFuncSetCacheConfig")
                _check(cuda.cuFuncGetAttribute(ctypes.byref(static), _SHARED_SIZE_BYTES, self.function), "attr")
                _check(
                    cuda.cuFuncSetAttribute(self.function, _MAX_DYNAMIC_SHARED_SIZE_BYTES, optin.value - static.value),
                    "cuFuncSetAttribute",
                )
        self.threads = 32 * int(descriptor["num_warps"])
        self.scratch_params = int(descriptor["scratch_params"])
        self.pdl = bool(descriptor.get("launch_pdl", False))
        self._attrs = pdl_attributes()
        # One 8-byte slot per kernel parameter, reused by every launch (the driver copies the values at launch):
        # the arguments specialized to the constant 1 are not parameters; the scratch pointers stay null.
        self._passed = [
            (i, type_.startswith("*")) for i, (_, type_, hint) in enumerate(spec.params) if hint != "1"
        ]  # fmt: skip
        self._slots = (ctypes.c_uint64 * (len(self._passed) + self.scratch_params))()
        base = ctypes.addressof(self._slots)
        self._params = (ctypes.c_void_p * len(self._slots))(*[base + 8 * j for j in range(len(self._slots))])
        self._config = CuLaunchConfig(
            1, 1, 1, self.threads, 1, 1, self.shared, None, self._attrs if self.pdl else None, 1 if self.pdl else 0
        )
        self._launch = _cuda().cuLaunchKernelEx
        self._lock = threading.Lock()  # the slots and config are shared; ctypes drops the GIL during the call

    def launch(self, grid, args: tuple) -> None:
        """On torch's current stream of the first argument's device (every kernel's first argument is a tensor)."""
        gx, gy, gz = (*grid, 1, 1)[:3]
        if gx <= 0 or gy <= 0 or gz <= 0:
            return
        stream = torch.cuda.current_stream(args[0].device).cuda_stream
        result = self._submit((gx, gy, gz), args, stream)
        if result == _INVALID_CONTEXT:  # a thread whose first CUDA work is this launch
            _make_current(self.device_index)
            result = self._submit((gx, gy, gz), args, stream)
        _check(result, "cuLaunchKernelEx")

    def _submit(self, grid: tuple[int, int, int], args: tuple, stream: int) -> int:
        with self._lock:
            slots = self._slots
            for j, (i, is_pointer) in enumerate(self._passed):
                slots[j] = args[i].data_ptr() if is_pointer else args[i] & 0xFFFFFFFF
            config = self._config
            config.gridDimX, config.gridDimY, config.gridDimZ = grid
            config.hStream = stream
            return self._launch(ctypes.byref(config), self.function, self._params, None)
