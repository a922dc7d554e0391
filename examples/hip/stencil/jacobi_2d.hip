// 2D Jacobi iteration for the Laplace equation on an nx x ny grid with fixed (Dirichlet) boundaries.
#include <hip/hip_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#define CHECK_HIP(stmt)                                                                \
    do {                                                                               \
        hipError_t rc = (stmt);                                                        \
        if (rc != hipSuccess) {                                                        \
            fprintf(stderr, "%s -> %s\n", #stmt, hipGetErrorString(rc));               \
            return EXIT_FAILURE;                                                       \
        }                                                                              \
    } while (0)

constexpr int BX = 32;
constexpr int BY = 8;

// Five-point stencil: u_new(i,j) = 0.25 * (left + right + up + down). Boundary cells are copied.
__global__ void jacobi_step(const float* __restrict__ u, float* __restrict__ u_new, int nx, int ny) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = blockIdx.y * blockDim.y + threadIdx.y;
    if (i >= nx || j >= ny) return;

    const int idx = j * nx + i;
    if (i == 0 || j == 0 || i == nx - 1 || j == ny - 1) {
        u_new[idx] = u[idx];
        return;
    }
    u_new[idx] = 0.25f * (u[idx - 1] + u[idx + 1] + u[idx - nx] + u[idx + nx]);
}

int main() {
    const int nx = 1024, ny = 768, iterations = 500;
    std::vector<float> h(nx * ny, 0.0f);
    for (int i = 0; i < nx; ++i) h[i] = 100.0f;  // hot top edge

    float *d_u, *d_v;
    CHECK_HIP(hipMalloc(&d_u, h.size() * sizeof(float)));
    CHECK_HIP(hipMalloc(&d_v, h.size() * sizeof(float)));
    CHECK_HIP(hipMemcpy(d_u, h.data(), h.size() * sizeof(float), hipMemcpyHostToDevice));
    CHECK_HIP(hipMemcpy(d_v, d_u, h.size() * sizeof(float), hipMemcpyDeviceToDevice));

    dim3 block(BX, BY);
    dim3 grid((nx + BX - 1) / BX, (ny + BY - 1) / BY);
    for (int it = 0; it < iterations; ++it) {
        jacobi_step<<<grid, block>>>(d_u, d_v, nx, ny);
        std::swap(d_u, d_v);  // ping-pong buffers
    }
    CHECK_HIP(hipGetLastError());
    CHECK_HIP(hipDeviceSynchronize());

    CHECK_HIP(hipMemcpy(h.data(), d_u, h.size() * sizeof(float), hipMemcpyDeviceToHost));
    printf("after %d iterations: u[1][nx/2] = %f, u[ny/2][nx/2] = %f\n", iterations, h[nx + nx / 2],
           h[(ny / 2) * nx + nx / 2]);

    CHECK_HIP(hipFree(d_u));
    CHECK_HIP(hipFree(d_v));
    return 0;
}
