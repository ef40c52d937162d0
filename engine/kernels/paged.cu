// CUDA kernels for gptj's paged KV cache: writing a step's new keys/values into their slots,
// and attention of each new token over the blocks of its own sequence.
//
// Cache layout per layer: [2][num_slots][heads * head_dim] (K then V), where a slot is
// block * block_size + position % block_size. Scores and softmax are computed in f32.
// Compiled to PTX by engine/build.rs when the `cuda` feature is on.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// One block per new token; threads copy its K and V rows into the token's slot.
template <typename T>
__device__ void write_kv(T *cache, const T *k, const T *v, const uint32_t *slots, uint32_t width,
                         uint64_t half_len) {
    const uint32_t t = blockIdx.x;
    const uint64_t dst = (uint64_t)slots[t] * width;
    const uint64_t src = (uint64_t)t * width;
    for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) {
        cache[dst + i] = k[src + i];
        cache[half_len + dst + i] = v[src + i];
    }
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

// Reduces `x` over the block; `scratch` holds one float per warp. All threads get the result.
template <bool IS_MAX>
__device__ float block_reduce(float x, float *scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    x = IS_MAX ? warp_max(x) : warp_sum(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < nwarps ? scratch[lane] : (IS_MAX ? -INFINITY : 0.0f);
    return IS_MAX ? warp_max(x) : warp_sum(x);
}

// Grid (tokens, heads); blockDim a multiple of 32. Dynamic shared memory:
// (head_dim + max_context + 32) floats: the query, the scores, reduction scratch.
template <typename T>
__device__ void paged_attention(T *out, const T *q, const T *cache, const uint32_t *positions,
                                const uint32_t *token_row, const uint32_t *tables,
                                const uint32_t *table_start, uint32_t heads, uint32_t dim,
                                uint32_t block_size, uint32_t max_context, uint64_t half_len,
                                float scale) {
    extern __shared__ float smem[];
    float *qs = smem;
    float *scores = smem + dim;
    float *scratch = scores + max_context;
    const uint32_t t = blockIdx.x, h = blockIdx.y, width = heads * dim;
    const uint32_t ctx = positions[t] + 1;
    const uint32_t *table = tables + table_start[token_row[t]];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;

    for (uint32_t d = threadIdx.x; d < dim; d += blockDim.x) qs[d] = to_f32(q[(uint64_t)t * width + h * dim + d]);
    __syncthreads();

    for (uint32_t j = warp; j < ctx; j += nwarps) {
        const uint64_t off = ((uint64_t)table[j / block_size] * block_size + j % block_size) * width + h * dim;
        float s = 0.0f;
        for (uint32_t d = lane; d < dim; d += 32) s += qs[d] * to_f32(cache[off + d]);
        s = warp_sum(s);
        if (lane == 0) scores[j] = s * scale;
    }
    __syncthreads();

    float m = -INFINITY;
    for (uint32_t j = threadIdx.x; j < ctx; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_reduce<true>(m, scratch);
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < ctx; j += blockDim.x) {
        const float e = __expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_reduce<false>(sum, scratch);
    __syncthreads();

    const float inv = 1.0f / sum;
    for (uint32_t d = threadIdx.x; d < dim; d += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t j = 0; j < ctx; ++j) {
            const uint64_t off = ((uint64_t)table[j / block_size] * block_size + j % block_size) * width + h * dim;
            acc += scores[j] * to_f32(cache[half_len + off + d]);
        }
        out[(uint64_t)t * width + h * dim + d] = from_f32<T>(acc * inv);
    }
}

#define GPTJ_KERNELS(SUFFIX, T)                                                                        \
    extern "C" __global__ void gptj_write_kv_##SUFFIX(T *cache, const T *k, const T *v,               \
                                                      const uint32_t *slots, uint32_t width,           \
                                                      uint64_t half_len) {                             \
        write_kv<T>(cache, k, v, slots, width, half_len);                                              \
    }                                                                                                  \
    extern "C" __global__ void gptj_paged_attention_##SUFFIX(                                          \
        T *out, const T *q, const T *cache, const uint32_t *positions, const uint32_t *token_row,      \
        const uint32_t *tables, const uint32_t *table_start, uint32_t heads, uint32_t dim,             \
        uint32_t block_size, uint32_t max_context, uint64_t half_len, float scale) {                   \
        paged_attention<T>(out, q, cache, positions, token_row, tables, table_start, heads, dim,       \
                           block_size, max_context, half_len, scale);                                  \
    }

GPTJ_KERNELS(f32, float)
GPTJ_KERNELS(f16, __half)
GPTJ_KERNELS(bf16, __nv_bfloat16)
