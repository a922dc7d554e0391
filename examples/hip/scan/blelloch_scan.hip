// Work-efficient exclusive prefix sum (Blelloch) of one block's worth of ints in shared memory.
// Handles n <= 2 * blockDim.x; larger inputs would need a multi-level scan over block sums.
#include <hip/hip_runtime.h>

#define NUM_BANKS 32
#define LOG_NUM_BANKS 5
#define CONFLICT_FREE_OFFSET(i) ((i) >> LOG_NUM_BANKS)

__global__ void exclusive_scan_block(const int* __restrict__ in, int* __restrict__ out, int n) {
    extern __shared__ int temp[];  // 2 * blockDim.x + padding ints, sized by the launcher
    const int tid = threadIdx.x;
    const int m = 2 * blockDim.x;  // power of two

    int ai = tid;
    int bi = tid + blockDim.x;
    temp[ai + CONFLICT_FREE_OFFSET(ai)] = ai < n ? in[ai] : 0;
    temp[bi + CONFLICT_FREE_OFFSET(bi)] = bi < n ? in[bi] : 0;

    // Up-sweep (reduce) phase.
    int offset = 1;
    for (int d = m >> 1; d > 0; d >>= 1) {
        __syncthreads();
        if (tid < d) {
            int a = offset * (2 * tid + 1) - 1;
            int b = offset * (2 * tid + 2) - 1;
            a += CONFLICT_FREE_OFFSET(a);
            b += CONFLICT_FREE_OFFSET(b);
            temp[b] += temp[a];
        }
        offset <<= 1;
    }

    if (tid == 0) temp[m - 1 + CONFLICT_FREE_OFFSET(m - 1)] = 0;

    // Down-sweep phase.
    for (int d = 1; d < m; d <<= 1) {
        offset >>= 1;
        __syncthreads();
        if (tid < d) {
            int a = offset * (2 * tid + 1) - 1;
            int b = offset * (2 * tid + 2) - 1;
            a += CONFLICT_FREE_OFFSET(a);
            b += CONFLICT_FREE_OFFSET(b);
            int t = temp[a];
            temp[a] = temp[b];
            temp[b] += t;
        }
    }
    __syncthreads();

    if (ai < n) out[ai] = temp[ai + CONFLICT_FREE_OFFSET(ai)];
    if (bi < n) out[bi] = temp[bi + CONFLICT_FREE_OFFSET(bi)];
}

// Launch helper: one block of `threads` threads (power of two) scans up to 2 * threads elements.
hipError_t launch_exclusive_scan(const int* d_in, int* d_out, int n, int threads, hipStream_t stream) {
    if (n <= 0) return hipSuccess;
    if (n > 2 * threads) return hipErrorInvalidValue;
    const int m = 2 * threads;
    const size_t shmem = (m + CONFLICT_FREE_OFFSET(m - 1) + 1) * sizeof(int);
    hipLaunchKernelGGL(exclusive_scan_block, dim3(1), dim3(threads), shmem, stream, d_in, d_out, n);
    return hipGetLastError();
}
