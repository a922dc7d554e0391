// Matrix transpose through a padded shared-memory tile (coalesced reads and writes).
#include <hip/hip_runtime.h>

#include <cstdio>
#include <vector>

constexpr int TILE_DIM = 32;
constexpr int BLOCK_ROWS = 8;

// in is rows x cols (row-major), out is cols x rows (row-major).
__global__ void transpose_tiled(float* __restrict__ out, const float* __restrict__ in, int rows, int cols) {
    // +1 column of padding avoids LDS bank conflicts when reading the tile by column.
    __shared__ float tile[TILE_DIM][TILE_DIM + 1];

    int x = blockIdx.x * TILE_DIM + threadIdx.x;
    int y = blockIdx.y * TILE_DIM + threadIdx.y;
    for (int j = 0; j < TILE_DIM; j += BLOCK_ROWS) {
        if (x < cols && (y + j) < rows) {
            tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + x];
        }
    }
    __syncthreads();

    x = blockIdx.y * TILE_DIM + threadIdx.x;
    y = blockIdx.x * TILE_DIM + threadIdx.y;
    for (int j = 0; j < TILE_DIM; j += BLOCK_ROWS) {
        if (x < rows && (y + j) < cols) {
            out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + j];
        }
    }
}

void transpose(float* d_out, const float* d_in, int rows, int cols, hipStream_t stream) {
    dim3 block(TILE_DIM, BLOCK_ROWS);
    dim3 grid((cols + TILE_DIM - 1) / TILE_DIM, (rows + TILE_DIM - 1) / TILE_DIM);
    hipLaunchKernelGGL(transpose_tiled, grid, block, 0, stream, d_out, d_in, rows, cols);
}

int main() {
    const int rows = 1000, cols = 1500;  // deliberately not multiples of TILE_DIM
    std::vector<float> h_in(rows * cols), h_out(rows * cols);
    for (int i = 0; i < rows * cols; ++i) h_in[i] = static_cast<float>(i);

    float *d_in, *d_out;
    hipMalloc(&d_in, h_in.size() * sizeof(float));
    hipMalloc(&d_out, h_out.size() * sizeof(float));
    hipMemcpy(d_in, h_in.data(), h_in.size() * sizeof(float), hipMemcpyHostToDevice);

    transpose(d_out, d_in, rows, cols, nullptr);
    hipMemcpy(h_out.data(), d_out, h_out.size() * sizeof(float), hipMemcpyDeviceToHost);

    bool ok = true;
    for (int r = 0; r < rows && ok; ++r)
        for (int c = 0; c < cols; ++c)
            if (h_out[c * rows + r] != h_in[r * cols + c]) { ok = false; break; }
    printf("transpose %dx%d: %s\n", rows, cols, ok ? "PASSED" : "FAILED");

    hipFree(d_in);
    hipFree(d_out);
    return ok ? 0 : 1;
}
