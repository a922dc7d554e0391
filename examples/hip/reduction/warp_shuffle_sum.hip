// Sum reduction of a float array: warp shuffles inside a wavefront, shared memory across wavefronts,
// one atomicAdd per block into the final result.
#include <hip/hip_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#define HIP_CHECK(x)                                                                           \
    do {                                                                                       \
        hipError_t status_ = (x);                                                              \
        if (status_ != hipSuccess) {                                                           \
            printf("HIP error '%s' (%s:%d)\n", hipGetErrorString(status_), __FILE__, __LINE__); \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

constexpr int BLOCK_SIZE = 256;

__device__ __forceinline__ float wave_reduce_sum(float v) {
    // warpSize is 64 on CDNA GPUs and 32 on RDNA; do not hard-code it.
    for (int offset = warpSize / 2; offset > 0; offset /= 2) {
        v += __shfl_down(v, offset);
    }
    return v;
}

__global__ void __launch_bounds__(BLOCK_SIZE) reduce_sum(const float* __restrict__ in, float* out, int n) {
    __shared__ float partial[BLOCK_SIZE / 32];  // enough slots for the smallest wavefront size

    float sum = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        sum += in[i];
    }

    const int lane = threadIdx.x % warpSize;
    const int wave = threadIdx.x / warpSize;
    sum = wave_reduce_sum(sum);
    if (lane == 0) partial[wave] = sum;
    __syncthreads();

    const int num_waves = blockDim.x / warpSize;
    if (wave == 0) {
        sum = lane < num_waves ? partial[lane] : 0.0f;
        sum = wave_reduce_sum(sum);
        if (lane == 0) atomicAdd(out, sum);
    }
}

int main() {
    const int n = 5'000'001;
    std::vector<float> h(n, 1.0f);

    float *d_in, *d_out;
    HIP_CHECK(hipMalloc(&d_in, n * sizeof(float)));
    HIP_CHECK(hipMalloc(&d_out, sizeof(float)));
    HIP_CHECK(hipMemcpy(d_in, h.data(), n * sizeof(float), hipMemcpyHostToDevice));
    HIP_CHECK(hipMemset(d_out, 0, sizeof(float)));

    const int grid = std::min((n + BLOCK_SIZE - 1) / BLOCK_SIZE, 1024);
    reduce_sum<<<grid, BLOCK_SIZE>>>(d_in, d_out, n);
    HIP_CHECK(hipGetLastError());

    float result = 0.0f;
    HIP_CHECK(hipMemcpy(&result, d_out, sizeof(float), hipMemcpyDeviceToHost));
    printf("sum = %.1f (expected %d)\n", result, n);

    HIP_CHECK(hipFree(d_in));
    HIP_CHECK(hipFree(d_out));
    return 0;
}
