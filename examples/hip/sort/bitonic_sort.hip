// Global-memory bitonic sort of unsigned ints; n must be a power of two (the host pads otherwise).
#include <hip/hip_runtime.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define HIP_ASSERT(x) \
    do { if ((x) != hipSuccess) { fprintf(stderr, "HIP failure at line %d\n", __LINE__); exit(1); } } while (0)

// One compare-exchange step of the bitonic network: stage size k, partner distance j.
__global__ void bitonic_step(unsigned int* data, unsigned int j, unsigned int k) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int partner = i ^ j;
    if (partner > i) {
        const bool ascending = (i & k) == 0;
        unsigned int a = data[i];
        unsigned int b = data[partner];
        if ((a > b) == ascending) {
            data[i] = b;
            data[partner] = a;
        }
    }
}

void bitonic_sort(unsigned int* d_data, unsigned int n) {
    const unsigned int threads = 256;
    const unsigned int blocks = (n + threads - 1) / threads;
    for (unsigned int k = 2; k <= n; k <<= 1) {
        for (unsigned int j = k >> 1; j > 0; j >>= 1) {
            hipLaunchKernelGGL(bitonic_step, dim3(blocks), dim3(threads), 0, 0, d_data, j, k);
        }
    }
    HIP_ASSERT(hipGetLastError());
}

int main() {
    const unsigned int count = 100000;
    unsigned int n = 1;
    while (n < count) n <<= 1;  // next power of two

    std::vector<unsigned int> h(n, UINT_MAX);  // padding sorts to the end
    for (unsigned int i = 0; i < count; ++i) h[i] = static_cast<unsigned int>(rand());

    unsigned int* d;
    HIP_ASSERT(hipMalloc(&d, n * sizeof(unsigned int)));
    HIP_ASSERT(hipMemcpy(d, h.data(), n * sizeof(unsigned int), hipMemcpyHostToDevice));
    bitonic_sort(d, n);
    HIP_ASSERT(hipMemcpy(h.data(), d, n * sizeof(unsigned int), hipMemcpyDeviceToHost));

    bool sorted = true;
    for (unsigned int i = 1; i < count; ++i) sorted &= h[i - 1] <= h[i];
    printf("bitonic sort of %u keys (padded to %u): %s\n", count, n, sorted ? "sorted" : "NOT sorted");
    HIP_ASSERT(hipFree(d));
    return sorted ? 0 : 1;
}
