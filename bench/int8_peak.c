/* Peak int8 multiply-accumulate throughput of this CPU, measured with the dot-product
 * instruction integer kernels are built from:
 *   x86-64 with AVX-512 VNNI: vpdpbusd zmm (64 u8×s8 products into 16 int32 per instruction)
 *   aarch64 with dotprod:     sdot v.4s (16 s8×s8 products into 4 int32 per instruction)
 *
 * Each thread runs independent accumulator chains (enough to hide the instruction's
 * latency) for a fixed number of iterations; the result is printed as
 *   <threads> <ops> <seconds> <GOPS>
 * with one multiply-accumulate counted as 2 ops, as GEMM GOPS are (2·M·N·K / time).
 *
 *   gcc -O3 -mavx512f -mavx512bw -mavx512vnni -pthread int8_peak.c -o int8_peak   (x86-64)
 *   gcc -O3 -march=armv8.2-a+dotprod -pthread int8_peak.c -o int8_peak              (aarch64)
 *   ./int8_peak [threads] [iterations]
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12

#if defined(__AVX512VNNI__)
#include <immintrin.h>
#define PRODUCTS_PER_INSTRUCTION 64
typedef __m512i acc_t;
static inline acc_t acc_zero(void) { return _mm512_setzero_si512(); }
static inline acc_t step(acc_t acc, acc_t a, acc_t b) { return _mm512_dpbusd_epi32(acc, a, b); }
static inline acc_t operand(int v) { return _mm512_set1_epi8((char)v); }
static inline int64_t reduce(acc_t acc) { return _mm512_reduce_add_epi32(acc); }
#elif defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define PRODUCTS_PER_INSTRUCTION 16
typedef int32x4_t acc_t;
static inline acc_t acc_zero(void) { return vdupq_n_s32(0); }
static inline acc_t step(acc_t acc, acc_t a, acc_t b)
{
    return vdotq_s32(acc, vreinterpretq_s8_s32(a), vreinterpretq_s8_s32(b));
}
static inline acc_t operand(int v) { return vreinterpretq_s32_s8(vdupq_n_s8((int8_t)v)); }
static inline int64_t reduce(acc_t acc) { return vaddvq_s32(acc); }
#else
#error "needs AVX-512 VNNI (x86-64) or the dotprod extension (aarch64)"
#endif

typedef struct {
    long iterations;
    int64_t sink;
} job_t;

static void *run(void *arg)
{
    job_t *job = arg;
    acc_t acc[CHAINS];
    acc_t a = operand(1 + (int)(job->iterations & 1)), b = operand(3);
    for (int c = 0; c < CHAINS; c++)
        acc[c] = acc_zero();
    for (long i = 0; i < job->iterations; i++) {
        for (int c = 0; c < CHAINS; c++)
            acc[c] = step(acc[c], a, b);
        __asm__ volatile("" : "+r"(i)); /* keep the loop: the sums depend on every step */
    }
    int64_t sum = 0;
    for (int c = 0; c < CHAINS; c++)
        sum += reduce(acc[c]);
    job->sink = sum;
    return NULL;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    long iterations = argc > 2 ? atol(argv[2]) : 20000000L;
    if (threads < 1 || threads > 256 || iterations < 1) {
        fprintf(stderr, "usage: %s [threads 1..256] [iterations]\n", argv[0]);
        return 2;
    }
    pthread_t tid[256];
    job_t jobs[256];
    double best = 1e30;
    for (int repeat = 0; repeat < 3; repeat++) {
        double start = now();
        for (int t = 0; t < threads; t++) {
            jobs[t].iterations = iterations;
            pthread_create(&tid[t], NULL, run, &jobs[t]);
        }
        for (int t = 0; t < threads; t++)
            pthread_join(tid[t], NULL);
        double seconds = now() - start;
        if (seconds < best)
            best = seconds;
    }
    int64_t check = 0;
    for (int t = 0; t < threads; t++)
        check += jobs[t].sink;
    double ops = 2.0 * PRODUCTS_PER_INSTRUCTION * CHAINS * (double)iterations * threads;
    printf("%d %.0f %.6f %.2f\n", threads, ops, best, ops / best * 1e-9);
    return check == 0; /* the sums are positive: 0 would mean the loop was optimised away */
}
