// LayerNorm forward over the last dimension with Welford statistics and a warp-per-row layout.
// y = (x - mean) / sqrt(var + eps) * gamma + beta; mean and rstd are saved for the backward pass.
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>

struct Welford {
    float mean = 0.0f;
    float m2 = 0.0f;
    float count = 0.0f;
};

__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
    Welford r;
    r.count = a.count + b.count;
    if (r.count == 0.0f) return r;
    const float delta = b.mean - a.mean;
    const float wb = b.count / r.count;
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
    return r;
}

// One wavefront (warpSize threads) per row; blockDim = (warpSize, ROWS_PER_BLOCK).
__global__ void layernorm_forward(const __half* __restrict__ x, const float* __restrict__ gamma,
                                  const float* __restrict__ beta, __half* __restrict__ y,
                                  float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows,
                                  int hidden, float eps) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const __half* xr = x + static_cast<size_t>(row) * hidden;
    __half* yr = y + static_cast<size_t>(row) * hidden;

    Welford w;
    for (int i = threadIdx.x; i < hidden; i += warpSize) {
        const float v = __half2float(xr[i]);
        w.count += 1.0f;
        const float d = v - w.mean;
        w.mean += d / w.count;
        w.m2 += d * (v - w.mean);
    }
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) {
        Welford o;
        o.mean = __shfl_xor(w.mean, offset);
        o.m2 = __shfl_xor(w.m2, offset);
        o.count = __shfl_xor(w.count, offset);
        w = welford_merge(w, o);
    }

    const float mean = w.mean;
    const float rstd = rsqrtf(w.m2 / hidden + eps);  // biased variance, like PyTorch
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
    for (int i = threadIdx.x; i < hidden; i += warpSize) {
        const float v = (__half2float(xr[i]) - mean) * rstd;
        yr[i] = __float2half(v * gamma[i] + beta[i]);
    }
}

void layernorm(const __half* x, const float* gamma, const float* beta, __half* y, float* mean, float* rstd,
               int rows, int hidden, hipStream_t stream, float eps = 1e-5f) {
    int warp = 0;
    hipDeviceGetAttribute(&warp, hipDeviceAttributeWarpSize, 0);
    constexpr int ROWS_PER_BLOCK = 4;
    dim3 block(warp, ROWS_PER_BLOCK);
    dim3 grid((rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
    hipLaunchKernelGGL(layernorm_forward, grid, block, 0, stream, x, gamma, beta, y, mean, rstd, rows, hidden,
                       eps);
}
