// Host-only utility: list every HIP device and print its main properties (no kernels).
#include <hip/hip_runtime.h>

#include <cstdio>
#include <cstdlib>

#define HIP_CALL(expr)                                                                   \
    do {                                                                                 \
        hipError_t err = (expr);                                                         \
        if (err != hipSuccess) {                                                         \
            std::fprintf(stderr, "%s failed: %s\n", #expr, hipGetErrorString(err));      \
            std::exit(EXIT_FAILURE);                                                     \
        }                                                                                \
    } while (0)

static double to_gib(size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

int main() {
    int count = 0;
    HIP_CALL(hipGetDeviceCount(&count));
    if (count == 0) {
        std::printf("No HIP devices found.\n");
        return 0;
    }

    int runtime = 0, driver = 0;
    HIP_CALL(hipRuntimeGetVersion(&runtime));
    HIP_CALL(hipDriverGetVersion(&driver));
    std::printf("HIP runtime %d, driver %d, %d device(s)\n\n", runtime, driver, count);

    for (int dev = 0; dev < count; ++dev) {
        hipDeviceProp_t p;
        HIP_CALL(hipGetDeviceProperties(&p, dev));
        std::printf("Device %d: %s (%s)\n", dev, p.name, p.gcnArchName);
        std::printf("  compute capability     : %d.%d\n", p.major, p.minor);
        std::printf("  compute units          : %d\n", p.multiProcessorCount);
        std::printf("  wavefront size         : %d\n", p.warpSize);
        std::printf("  max threads per block  : %d\n", p.maxThreadsPerBlock);
        std::printf("  max block dims         : %d x %d x %d\n", p.maxThreadsDim[0], p.maxThreadsDim[1],
                    p.maxThreadsDim[2]);
        std::printf("  shared mem per block   : %zu KiB\n", p.sharedMemPerBlock / 1024);
        std::printf("  registers per block    : %d\n", p.regsPerBlock);
        std::printf("  global memory          : %.2f GiB\n", to_gib(p.totalGlobalMem));
        std::printf("  L2 cache               : %d KiB\n", p.l2CacheSize / 1024);
        std::printf("  memory clock / bus     : %d MHz / %d-bit\n", p.memoryClockRate / 1000, p.memoryBusWidth);
        std::printf("  peak bandwidth         : %.1f GB/s\n",
                    2.0 * p.memoryClockRate * 1e3 * (p.memoryBusWidth / 8) / 1e9);
        std::printf("  managed memory         : %s\n", p.managedMemory ? "yes" : "no");
        std::printf("  concurrent kernels     : %s\n\n", p.concurrentKernels ? "yes" : "no");
    }

    int current = 0;
    HIP_CALL(hipGetDevice(&current));
    size_t free_b = 0, total_b = 0;
    HIP_CALL(hipMemGetInfo(&free_b, &total_b));
    std::printf("Current device %d: %.2f of %.2f GiB free\n", current, to_gib(free_b), to_gib(total_b));
    return 0;
}
