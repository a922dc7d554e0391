// 256-bin byte histogram: privatized per-block histograms in shared memory, merged with global atomics.
#include <hip/hip_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define HIP_CHECK(call)                                                              \
    do {                                                                             \
        hipError_t e_ = (call);                                                      \
        if (e_ != hipSuccess) {                                                      \
            fprintf(stderr, "HIP error %d: %s\n", (int)e_, hipGetErrorString(e_));   \
            abort();                                                                 \
        }                                                                            \
    } while (0)

constexpr int NUM_BINS = 256;

__global__ void histogram256(const uint8_t* __restrict__ data, size_t n, unsigned int* __restrict__ bins) {
    __shared__ unsigned int local[NUM_BINS];
    for (int b = threadIdx.x; b < NUM_BINS; b += blockDim.x) local[b] = 0;
    __syncthreads();

    const size_t stride = static_cast<size_t>(blockDim.x) * gridDim.x;
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
        atomicAdd(&local[data[i]], 1u);
    }
    __syncthreads();

    for (int b = threadIdx.x; b < NUM_BINS; b += blockDim.x) {
        if (local[b] != 0) atomicAdd(&bins[b], local[b]);
    }
}

int main() {
    const size_t n = 64 << 20;
    std::vector<uint8_t> h_data(n);
    srand(42);
    for (auto& v : h_data) v = static_cast<uint8_t>(rand() & 0xFF);

    uint8_t* d_data;
    unsigned int* d_bins;
    HIP_CHECK(hipMalloc(&d_data, n));
    HIP_CHECK(hipMalloc(&d_bins, NUM_BINS * sizeof(unsigned int)));
    HIP_CHECK(hipMemcpy(d_data, h_data.data(), n, hipMemcpyHostToDevice));
    HIP_CHECK(hipMemset(d_bins, 0, NUM_BINS * sizeof(unsigned int)));

    hipDeviceProp_t prop;
    HIP_CHECK(hipGetDeviceProperties(&prop, 0));
    histogram256<<<prop.multiProcessorCount * 8, 512>>>(d_data, n, d_bins);
    HIP_CHECK(hipGetLastError());

    std::vector<unsigned int> h_bins(NUM_BINS), ref(NUM_BINS, 0);
    HIP_CHECK(hipMemcpy(h_bins.data(), d_bins, NUM_BINS * sizeof(unsigned int), hipMemcpyDeviceToHost));
    for (uint8_t v : h_data) ref[v]++;

    int bad = 0;
    for (int b = 0; b < NUM_BINS; ++b) bad += h_bins[b] != ref[b];
    printf("%s (%d mismatched bins)\n", bad ? "FAILED" : "PASSED", bad);

    HIP_CHECK(hipFree(d_data));
    HIP_CHECK(hipFree(d_bins));
    return bad ? 1 : 0;
}
