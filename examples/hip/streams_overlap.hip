// Overlap host<->device copies with compute by splitting the work into chunks over several streams,
// timed with HIP events against a single synchronous pass.
#include <hip/hip_runtime.h>

#include <cstdio>
#include <cstdlib>

#define HIP_CHECK(c)                                                                          \
    do {                                                                                      \
        hipError_t s_ = (c);                                                                  \
        if (s_ != hipSuccess) {                                                               \
            fprintf(stderr, "HIP error %s at %s:%d\n", hipGetErrorName(s_), __FILE__, __LINE__); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

constexpr int NUM_STREAMS = 4;

__global__ void scale_sqrt(float* data, int n, float factor) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) data[i] = sqrtf(data[i]) * factor;
}

int main() {
    const int n = 1 << 24;
    const int chunk = n / NUM_STREAMS;  // n is divisible by NUM_STREAMS
    const size_t bytes = n * sizeof(float);

    float* h_data;
    HIP_CHECK(hipHostMalloc(&h_data, bytes, hipHostMallocDefault));  // pinned, needed for async copies
    for (int i = 0; i < n; ++i) h_data[i] = static_cast<float>(i % 1000);

    float* d_data;
    HIP_CHECK(hipMalloc(&d_data, bytes));

    hipStream_t streams[NUM_STREAMS];
    for (auto& s : streams) HIP_CHECK(hipStreamCreateWithFlags(&s, hipStreamNonBlocking));
    hipEvent_t start, stop;
    HIP_CHECK(hipEventCreate(&start));
    HIP_CHECK(hipEventCreate(&stop));

    // Baseline: one copy in, one kernel, one copy out on the null stream.
    HIP_CHECK(hipEventRecord(start, 0));
    HIP_CHECK(hipMemcpy(d_data, h_data, bytes, hipMemcpyHostToDevice));
    scale_sqrt<<<(n + 255) / 256, 256>>>(d_data, n, 2.0f);
    HIP_CHECK(hipMemcpy(h_data, d_data, bytes, hipMemcpyDeviceToHost));
    HIP_CHECK(hipEventRecord(stop, 0));
    HIP_CHECK(hipEventSynchronize(stop));
    float ms_sync = 0.0f;
    HIP_CHECK(hipEventElapsedTime(&ms_sync, start, stop));

    // Pipelined: each stream copies in, computes and copies out its own chunk.
    HIP_CHECK(hipEventRecord(start, 0));
    for (int s = 0; s < NUM_STREAMS; ++s) {
        const int offset = s * chunk;
        HIP_CHECK(hipMemcpyAsync(d_data + offset, h_data + offset, chunk * sizeof(float),
                                 hipMemcpyHostToDevice, streams[s]));
        scale_sqrt<<<(chunk + 255) / 256, 256, 0, streams[s]>>>(d_data + offset, chunk, 2.0f);
        HIP_CHECK(hipMemcpyAsync(h_data + offset, d_data + offset, chunk * sizeof(float),
                                 hipMemcpyDeviceToHost, streams[s]));
    }
    for (auto& s : streams) HIP_CHECK(hipStreamSynchronize(s));
    HIP_CHECK(hipEventRecord(stop, 0));
    HIP_CHECK(hipEventSynchronize(stop));
    float ms_async = 0.0f;
    HIP_CHECK(hipEventElapsedTime(&ms_async, start, stop));

    printf("synchronous: %.3f ms, %d streams: %.3f ms (speed-up %.2fx)\n", ms_sync, NUM_STREAMS, ms_async,
           ms_sync / ms_async);

    HIP_CHECK(hipEventDestroy(start));
    HIP_CHECK(hipEventDestroy(stop));
    for (auto& s : streams) HIP_CHECK(hipStreamDestroy(s));
    HIP_CHECK(hipFree(d_data));
    HIP_CHECK(hipHostFree(h_data));
    return 0;
}
