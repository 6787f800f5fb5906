/* A CUDA driver that does nothing, for timing tritonbn's host path without a GPU.
 *
 * Built by `python -m bench.host` (bench/host.py) into libcuda.so.1 and put first on the
 * library path, so that Triton's NVIDIA backend builds and runs its real C launcher: every
 * launch goes through JITFunction.run, the binder, the kernel cache and the launcher, and ends
 * here, where nothing is executed. Kernels are compiled for sm_90 as on an H100; CPU tensors
 * stand in for device tensors (their pointers are passed, never dereferenced).
 *
 * For the launch-equivalence test, cuLaunchKernelEx can record what it receives: the grid, the
 * block, the dynamic shared memory and the bytes of every kernel parameter, whose sizes the
 * caller states first (tbn_record_start); tbn_record_read copies the record out.
 */
#include <stddef.h>
#include <string.h>

typedef int CUresult;
typedef void *CUhandle;
#define OK 0

typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUhandle hStream;
    void *attrs;
    unsigned int numAttrs;
} LaunchConfig;  /* CUlaunchConfig's layout */

static char the_context, the_module, the_function;

/* ---- recording ------------------------------------------------------------------------- */
#define MAX_PARAMS 128
#define LOG_BYTES (1 << 20)
static int n_sizes, sizes[MAX_PARAMS], recording;
static unsigned char log_buf[LOG_BYTES];
static size_t log_len;

void tbn_record_start(int n, const int *param_sizes) {
    n_sizes = n < MAX_PARAMS ? n : MAX_PARAMS;
    memcpy(sizes, param_sizes, sizeof(int) * n_sizes);
    log_len = 0;
    recording = 1;
}

size_t tbn_record_read(unsigned char *out, size_t capacity) {
    size_t n = log_len < capacity ? log_len : capacity;
    memcpy(out, log_buf, n);
    recording = 0;
    return n;
}

static void record(const void *data, size_t n) {
    if (log_len + n <= LOG_BYTES) {
        memcpy(log_buf + log_len, data, n);
        log_len += n;
    }
}

CUresult cuLaunchKernelEx(const LaunchConfig *config, CUhandle f, void **params, void **extra) {
    if (recording) {
        unsigned int dims[7] = {config->gridDimX, config->gridDimY, config->gridDimZ,
                                config->blockDimX, config->blockDimY, config->blockDimZ,
                                config->sharedMemBytes};
        record(dims, sizeof(dims));
        for (int i = 0; i < n_sizes; i++) record(params[i], (size_t)sizes[i]);
    }
    return OK;
}

/* ---- a context, a device that answers like an H100, modules that load ------------------ */
CUresult cuInit(unsigned int flags) { return OK; }
CUresult cuDriverGetVersion(int *version) { *version = 12080; return OK; }
CUresult cuDeviceGet(int *device, int ordinal) { *device = 0; return OK; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return OK; }
CUresult cuCtxGetCurrent(CUhandle *ctx) { *ctx = &the_context; return OK; }
CUresult cuCtxSetCurrent(CUhandle ctx) { return OK; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return OK; }
CUresult cuCtxGetLimit(size_t *value, int limit) { *value = 0; return OK; }
CUresult cuCtxSetLimit(int limit, size_t value) { return OK; }
CUresult cuDevicePrimaryCtxRetain(CUhandle *ctx, int device) { *ctx = &the_context; return OK; }

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
    switch (attribute) {
        case 1: *value = 1024; break;       /* max threads per block */
        case 8: *value = 49152; break;      /* shared memory per block */
        case 10: *value = 32; break;        /* warp size */
        case 12: *value = 65536; break;     /* registers per block */
        case 16: *value = 132; break;       /* multiprocessors */
        case 75: *value = 9; break;         /* compute capability major */
        case 76: *value = 0; break;         /* compute capability minor */
        case 81: *value = 233472; break;    /* shared memory per multiprocessor */
        case 97: *value = 232448; break;    /* shared memory per block, opt-in */
        default: *value = 1;
    }
    return OK;
}

CUresult cuModuleLoadData(CUhandle *module, const void *image) { *module = &the_module; return OK; }
CUresult cuModuleUnload(CUhandle module) { return OK; }
CUresult cuModuleGetFunction(CUhandle *f, CUhandle module, const char *name) {
    *f = &the_function;
    return OK;
}
CUresult cuFuncGetAttribute(int *value, int attribute, CUhandle f) {
    switch (attribute) {
        case 0: *value = 1024; break;       /* max threads per block */
        case 4: *value = 64; break;         /* registers per thread */
        default: *value = 0;
    }
    return OK;
}
CUresult cuFuncSetAttribute(CUhandle f, int attribute, int value) { return OK; }
CUresult cuFuncSetCacheConfig(CUhandle f, int config) { return OK; }
CUresult cuOccupancyMaxActiveClusters(int *n, CUhandle f, const void *config) {
    *n = 1;
    return OK;
}
CUresult cuPointerGetAttribute(void *data, int attribute, unsigned long long ptr) { return OK; }
CUresult cuPointerGetAttributes(unsigned int n, int *attributes, void **data,
                                unsigned long long ptr) {
    return OK;
}
CUresult cuStreamIsCapturing(CUhandle stream, int *status) { *status = 0; return OK; }
CUresult cuTensorMapEncodeTiled(void) { return OK; }
CUresult cuTensorMapEncodeIm2col(void) { return OK; }
CUresult cuGetErrorString(CUresult error, const char **text) { *text = "no error"; return OK; }
CUresult cuGetErrorName(CUresult error, const char **text) { *text = "CUDA_SUCCESS"; return OK; }
