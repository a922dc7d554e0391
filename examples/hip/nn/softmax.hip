// Row-wise numerically stable softmax over a [rows x cols] float matrix, one block per row.
#include <hip/hip_runtime.h>

#include <cfloat>

constexpr int THREADS = 256;

template <typename Op>
__device__ float block_reduce(float v, Op op) {
    __shared__ float scratch[THREADS];
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + s]);
        __syncthreads();
    }
    float result = scratch[0];
    __syncthreads();  // scratch is reused by the next call
    return result;
}

struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};

// out[r, c] = exp(in[r, c] - max_r) / sum_c exp(in[r, c] - max_r)
__global__ void __launch_bounds__(THREADS) softmax_rows(const float* __restrict__ in, float* __restrict__ out,
                                                        int rows, int cols) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* x = in + static_cast<size_t>(row) * cols;
    float* y = out + static_cast<size_t>(row) * cols;

    float local_max = -FLT_MAX;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) local_max = fmaxf(local_max, x[c]);
    const float row_max = block_reduce(local_max, MaxOp{});

    float local_sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = __expf(x[c] - row_max);
        y[c] = e;
        local_sum += e;
    }
    const float inv_sum = 1.0f / block_reduce(local_sum, SumOp{});

    for (int c = threadIdx.x; c < cols; c += blockDim.x) y[c] *= inv_sum;
}

void softmax(const float* d_in, float* d_out, int rows, int cols, hipStream_t stream) {
    if (rows == 0 || cols == 0) return;
    softmax_rows<<<rows, THREADS, 0, stream>>>(d_in, d_out, rows, cols);
}
