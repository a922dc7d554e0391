// SAXPY (y = a * x + y) with a grid-stride loop, using managed memory.
#include <hip/hip_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(call)                                                      \
    do {                                                                 \
        hipError_t status = (call);                                      \
        if (status != hipSuccess) {                                      \
            fprintf(stderr, "%s failed: %s\n", #call,                    \
                    hipGetErrorString(status));                          \
            exit(1);                                                     \
        }                                                                \
    } while (0)

__global__ void saxpy(int n, float a, const float* x, float* y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = a * x[i] + y[i];
    }
}

int main(int argc, char** argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10000000;
    float a = 2.5f;

    float *x, *y;
    CHECK(hipMallocManaged(&x, n * sizeof(float)));
    CHECK(hipMallocManaged(&y, n * sizeof(float)));
    for (int i = 0; i < n; ++i) {
        x[i] = 1.0f;
        y[i] = 2.0f;
    }

    int device = 0, sms = 0;
    CHECK(hipGetDevice(&device));
    CHECK(hipDeviceGetAttribute(&sms, hipDeviceAttributeMultiprocessorCount, device));

    // A few blocks per compute unit is enough for a grid-stride loop.
    saxpy<<<sms * 4, 256>>>(n, a, x, y);
    CHECK(hipGetLastError());
    CHECK(hipDeviceSynchronize());

    float max_err = 0.0f;
    for (int i = 0; i < n; ++i) {
        float e = fabsf(y[i] - 4.5f);
        max_err = e > max_err ? e : max_err;
    }
    printf("n=%d max error=%g\n", n, max_err);

    CHECK(hipFree(x));
    CHECK(hipFree(y));
    return 0;
}
