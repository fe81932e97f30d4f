// SPDX-License-Identifier: Apache-2.0
// The floor of a small pull on this machine, in C: what kvbridge's 4 KiB
// pull could cost with no Python on its path, next to the bare
// request/reply the transport benchmark's raw-socket baseline measures.
//
// Two processes over TCP on 127.0.0.1 (TCP_NODELAY), N round trips each:
//   bare: 48-byte request -> 4 KiB reply (the raw-socket baseline's shape)
//   pull: 48-byte Pull -> 64-byte grant + 4 KiB data in one writev; the
//         consumer lands it, checks a digest of it against the grant's and
//         sends a 16-byte ReadDone without waiting (kvbridge tcp's exchange)
// Placement: both processes on one CPU, or on two (where each round trip
// wakes a thread on the other CPU).
//
// Usage: pull_floor {bare|pull} [consumer_cpu producer_cpu] [N]
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static void recv_exact(int fd, void* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = recv(fd, (char*)buf + got, n - got, 0);
    if (r <= 0) exit(1);
    got += (size_t)r;
  }
}

// A stand-in for XXH3 (not on this machine as a header): reads every byte.
static uint64_t digest(const uint64_t* p, size_t words) {
  uint64_t h = 0;
  for (size_t i = 0; i < words; i++) h = h * 31 + p[i];
  return h;
}

static void pin(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof set, &set) != 0) perror("sched_setaffinity");
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s {bare|pull} [consumer_cpu producer_cpu] [N]\n", argv[0]);
    return 2;
  }
  const int pull = strcmp(argv[1], "pull") == 0;
  const int consumer_cpu = argc > 3 ? atoi(argv[2]) : -1;
  const int producer_cpu = argc > 3 ? atoi(argv[3]) : -1;
  const int n = argc > 4 ? atoi(argv[4]) : 20000;
  int one = 1;
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {0};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  socklen_t len = sizeof addr;
  if (bind(listener, (struct sockaddr*)&addr, sizeof addr) || listen(listener, 1) ||
      getsockname(listener, (struct sockaddr*)&addr, &len)) {
    perror("listen");
    return 1;
  }
  static char data[4096], landed[4096];
  memset(data, 7, sizeof data);
  pid_t producer = fork();
  if (producer == 0) {
    pin(producer_cpu);
    int c = accept(listener, NULL, NULL);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[48], grant[64] = {0}, done[16];
    uint64_t d = digest((const uint64_t*)data, sizeof data / 8);
    memcpy(grant, &d, sizeof d);
    for (int i = 0; i < n; i++) {
      recv_exact(c, req, sizeof req);
      struct iovec v[2] = {{grant, sizeof grant}, {data, sizeof data}};
      if (pull) {
        if (writev(c, v, 2) < 0) _exit(1);
        recv_exact(c, done, sizeof done);  // read at leisure, off the timed path
      } else {
        if (send(c, data, sizeof data, 0) < 0) _exit(1);
      }
    }
    _exit(0);
  }
  pin(consumer_cpu);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(s, (struct sockaddr*)&addr, sizeof addr)) {
    perror("connect");
    return 1;
  }
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  double* t = malloc(n * sizeof *t);
  char req[48] = {1}, grant[64], done[16] = {2};
  for (int i = 0; i < n; i++) {
    double t0 = now_us();
    send(s, req, sizeof req, 0);
    if (pull) {
      recv_exact(s, grant, sizeof grant);
      recv_exact(s, landed, sizeof landed);
      uint64_t want, got = digest((const uint64_t*)landed, sizeof landed / 8);
      memcpy(&want, grant, sizeof want);
      if (got != want) abort();
      send(s, done, sizeof done, MSG_DONTWAIT);
    } else {
      recv_exact(s, landed, sizeof landed);
    }
    t[i] = now_us() - t0;
  }
  qsort(t, n, sizeof *t, by_value);
  printf("%s\t%s\t%.1f\t%.1f\t%.1f\n", pull ? "pull" : "bare",
         consumer_cpu < 0 ? "unpinned" : consumer_cpu == producer_cpu ? "one CPU" : "two CPUs",
         t[n / 10], t[n / 2], t[n * 9 / 10]);
  waitpid(producer, NULL, 0);
  return 0;
}
