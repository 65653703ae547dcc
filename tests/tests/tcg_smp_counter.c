#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
static long atomic_counter, plain_counter, n;
static void *work(void *arg) {
    int cpu = (int)(long)arg;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s)) { perror("sched_setaffinity"); exit(2); }
    for (long i = 0; i < n; i++) {
        __atomic_fetch_add(&atomic_counter, 1, __ATOMIC_SEQ_CST);
        long v = __atomic_load_n(&plain_counter, __ATOMIC_RELAXED);
        __atomic_store_n(&plain_counter, v + 1, __ATOMIC_RELAXED);
    }
    printf("SMP thread cpu=%d ran_on=%d\n", cpu, sched_getcpu());
    return 0;
}
int main(int argc, char **argv) {
    n = argc > 1 ? atol(argv[1]) : 1000000;
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], 0, work, (void *)i);
    for (int i = 0; i < 2; i++) pthread_join(t[i], 0);
    printf("SMP counters n=%ld atomic=%ld plain=%ld\n", n, atomic_counter, plain_counter);
    return 0;
}
