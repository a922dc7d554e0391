// Tiled single-precision GEMM: C = alpha * A * B + beta * C, all row-major.
#include <hip/hip_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define HIP_CHECK(cmd)                                                                    \
    do {                                                                                  \
        hipError_t e = (cmd);                                                             \
        if (e != hipSuccess) {                                                            \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, hipGetErrorString(e));     \
            exit(EXIT_FAILURE);                                                           \
        }                                                                                 \
    } while (0)

template <int TILE>
__global__ void sgemm_tiled(int M, int N, int K, float alpha, const float* A, const float* B, float beta,
                            float* C) {
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE];

    const int row = blockIdx.y * TILE + threadIdx.y;
    const int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;

    for (int t = 0; t < (K + TILE - 1) / TILE; ++t) {
        const int a_col = t * TILE + threadIdx.x;
        const int b_row = t * TILE + threadIdx.y;
        As[threadIdx.y][threadIdx.x] = (row < M && a_col < K) ? A[row * K + a_col] : 0.0f;
        Bs[threadIdx.y][threadIdx.x] = (b_row < K && col < N) ? B[b_row * N + col] : 0.0f;
        __syncthreads();

#pragma unroll
        for (int k = 0; k < TILE; ++k) {
            acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];
        }
        __syncthreads();
    }

    if (row < M && col < N) {
        C[row * N + col] = alpha * acc + beta * C[row * N + col];
    }
}

static void sgemm_reference(int M, int N, int K, float alpha, const float* A, const float* B, float beta,
                            float* C) {
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = 0.0f;
            for (int k = 0; k < K; ++k) s += A[i * K + k] * B[k * N + j];
            C[i * N + j] = alpha * s + beta * C[i * N + j];
        }
}

int main() {
    constexpr int TILE = 16;
    const int M = 300, N = 200, K = 250;
    const float alpha = 1.0f, beta = 0.5f;

    std::vector<float> A(M * K), B(K * N), C(M * N), C_ref;
    for (auto& v : A) v = static_cast<float>(rand()) / RAND_MAX - 0.5f;
    for (auto& v : B) v = static_cast<float>(rand()) / RAND_MAX - 0.5f;
    for (auto& v : C) v = 1.0f;
    C_ref = C;

    float *dA, *dB, *dC;
    HIP_CHECK(hipMalloc(&dA, A.size() * sizeof(float)));
    HIP_CHECK(hipMalloc(&dB, B.size() * sizeof(float)));
    HIP_CHECK(hipMalloc(&dC, C.size() * sizeof(float)));
    HIP_CHECK(hipMemcpy(dA, A.data(), A.size() * sizeof(float), hipMemcpyHostToDevice));
    HIP_CHECK(hipMemcpy(dB, B.data(), B.size() * sizeof(float), hipMemcpyHostToDevice));
    HIP_CHECK(hipMemcpy(dC, C.data(), C.size() * sizeof(float), hipMemcpyHostToDevice));

    dim3 block(TILE, TILE);
    dim3 grid((N + TILE - 1) / TILE, (M + TILE - 1) / TILE);
    sgemm_tiled<TILE><<<grid, block>>>(M, N, K, alpha, dA, dB, beta, dC);
    HIP_CHECK(hipGetLastError());
    HIP_CHECK(hipMemcpy(C.data(), dC, C.size() * sizeof(float), hipMemcpyDeviceToHost));

    sgemm_reference(M, N, K, alpha, A.data(), B.data(), beta, C_ref.data());
    float max_diff = 0.0f;
    for (size_t i = 0; i < C.size(); ++i) max_diff = fmaxf(max_diff, fabsf(C[i] - C_ref[i]));
    printf("sgemm %dx%dx%d max |diff| = %e\n", M, N, K, max_diff);

    HIP_CHECK(hipFree(dA));
    HIP_CHECK(hipFree(dB));
    HIP_CHECK(hipFree(dC));
    return max_diff < 1e-3f ? 0 : 1;
}
