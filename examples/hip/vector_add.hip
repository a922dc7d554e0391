// Element-wise vector addition: c[i] = a[i] + b[i].
#include <hip/hip_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define HIP_CHECK(expr)                                                              \
    do {                                                                             \
        hipError_t err_ = (expr);                                                    \
        if (err_ != hipSuccess) {                                                    \
            std::fprintf(stderr, "HIP error %s at %s:%d\n", hipGetErrorString(err_), \
                         __FILE__, __LINE__);                                        \
            std::exit(EXIT_FAILURE);                                                 \
        }                                                                            \
    } while (0)

__global__ void vector_add(const float* __restrict__ a, const float* __restrict__ b,
                           float* __restrict__ c, size_t n) {
    size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
    if (i < n) {
        c[i] = a[i] + b[i];
    }
}

int main() {
    const size_t n = 1 << 20;
    const size_t bytes = n * sizeof(float);

    std::vector<float> h_a(n), h_b(n), h_c(n);
    for (size_t i = 0; i < n; ++i) {
        h_a[i] = static_cast<float>(i);
        h_b[i] = 2.0f * static_cast<float>(i);
    }

    float *d_a = nullptr, *d_b = nullptr, *d_c = nullptr;
    HIP_CHECK(hipMalloc(&d_a, bytes));
    HIP_CHECK(hipMalloc(&d_b, bytes));
    HIP_CHECK(hipMalloc(&d_c, bytes));
    HIP_CHECK(hipMemcpy(d_a, h_a.data(), bytes, hipMemcpyHostToDevice));
    HIP_CHECK(hipMemcpy(d_b, h_b.data(), bytes, hipMemcpyHostToDevice));

    const int block = 256;
    const int grid = static_cast<int>((n + block - 1) / block);
    hipLaunchKernelGGL(vector_add, dim3(grid), dim3(block), 0, 0, d_a, d_b, d_c, n);
    HIP_CHECK(hipGetLastError());
    HIP_CHECK(hipMemcpy(h_c.data(), d_c, bytes, hipMemcpyDeviceToHost));

    size_t errors = 0;
    for (size_t i = 0; i < n; ++i) {
        if (std::fabs(h_c[i] - 3.0f * static_cast<float>(i)) > 1e-3f) ++errors;
    }
    std::printf("vector_add: %zu elements, %zu errors\n", n, errors);

    HIP_CHECK(hipFree(d_a));
    HIP_CHECK(hipFree(d_b));
    HIP_CHECK(hipFree(d_c));
    return errors == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
