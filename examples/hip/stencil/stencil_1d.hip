// 1D-Stencil mit Radius RADIUS: out[i] = Summe von in[i-RADIUS .. i+RADIUS].
// 1次元ステンシル・カーネル（共有メモリ + ハロー領域）。
#include <hip/hip_runtime.h>

#include <cstdio>
#include <vector>

#define RADIUS 3
#define BLOCK_SIZE 256

#define HIP_CHECK(ausdruck)                                                      \
    do {                                                                         \
        hipError_t fehler = (ausdruck);                                          \
        if (fehler != hipSuccess) {                                              \
            fprintf(stderr, "Fehler: %s (Zeile %d)\n", hipGetErrorString(fehler), \
                    __LINE__);                                                   \
            return 1;                                                            \
        }                                                                        \
    } while (0)

// カーネル: 各ブロックは BLOCK_SIZE + 2*RADIUS 要素を共有メモリに読み込む。
__global__ void stencil_1d(const float* in, float* out, int n) {
    __shared__ float temp[BLOCK_SIZE + 2 * RADIUS];
    int gindex = blockIdx.x * blockDim.x + threadIdx.x;
    int lindex = threadIdx.x + RADIUS;

    // Innere Elemente laden; außerhalb des Feldes wird mit 0 aufgefüllt (Randbedingung).
    temp[lindex] = gindex < n ? in[gindex] : 0.0f;
    if (threadIdx.x < RADIUS) {
        int links = gindex - RADIUS;
        int rechts = gindex + BLOCK_SIZE;
        temp[lindex - RADIUS] = links >= 0 ? in[links] : 0.0f;
        temp[lindex + BLOCK_SIZE] = rechts < n ? in[rechts] : 0.0f;
    }
    __syncthreads();  // 全スレッドの読み込み完了を待つ

    if (gindex < n) {
        float summe = 0.0f;
        for (int off = -RADIUS; off <= RADIUS; ++off) summe += temp[lindex + off];
        out[gindex] = summe;
    }
}

int main() {
    const int größe = 1 << 16;  // Problemgröße
    std::vector<float> h_in(größe, 1.0f), h_out(größe);

    float *d_in, *d_out;
    HIP_CHECK(hipMalloc(&d_in, größe * sizeof(float)));
    HIP_CHECK(hipMalloc(&d_out, größe * sizeof(float)));
    HIP_CHECK(hipMemcpy(d_in, h_in.data(), größe * sizeof(float), hipMemcpyHostToDevice));

    // ブロック数 = ceil(größe / BLOCK_SIZE)
    stencil_1d<<<(größe + BLOCK_SIZE - 1) / BLOCK_SIZE, BLOCK_SIZE>>>(d_in, d_out, größe);
    HIP_CHECK(hipGetLastError());
    HIP_CHECK(hipMemcpy(h_out.data(), d_out, größe * sizeof(float), hipMemcpyDeviceToHost));

    // Prüfung: innen 2*RADIUS+1, am Rand weniger Nachbarn.
    printf("out[0]=%.0f out[%d]=%.0f (erwartet %d und %d)\n", h_out[0], größe / 2, h_out[größe / 2],
           RADIUS + 1, 2 * RADIUS + 1);

    HIP_CHECK(hipFree(d_in));
    HIP_CHECK(hipFree(d_out));
    return 0;
}
