/* hwrng-read: reads /dev/hwrng in fixed-size reads, timing each one.
 *
 * Usage: hwrng-read OUT LATENCIES BYTES BLOCK SECONDS
 *
 * Reads BYTES bytes from /dev/hwrng with read(2) calls of BLOCK bytes (a
 * short read is completed by the next call), giving up after SECONDS.
 * Writes the bytes to OUT and, to LATENCIES, one line per read(2): its
 * duration in nanoseconds (CLOCK_MONOTONIC) and the bytes it returned.
 * Prints one summary line on stdout:
 *   bytes=N secs=S reads=N
 * Exit status: 0 if all BYTES were read, 2 on a timeout, 1 on an error.
 *
 * Part of tests/vm (vhost-user-rng): busybox has no way to time a 64-byte
 * read, and a process per read would cost milliseconds under TCG.
 * Built by tests/vm/run with gcc -static.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t timed_out;

static void on_alarm(int sig) { (void)sig; timed_out = 1; }

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s OUT LATENCIES BYTES BLOCK SECONDS\n", argv[0]);
    return 1;
  }
  long want = atol(argv[3]), block = atol(argv[4]);
  int secs = atoi(argv[5]);
  if (want <= 0 || block <= 0 || block > 65536 || secs <= 0) {
    fprintf(stderr, "hwrng-read: bad arguments\n");
    return 1;
  }
  FILE *out = fopen(argv[1], "wb"), *lat = fopen(argv[2], "w");
  if (!out || !lat) { perror("hwrng-read: output"); return 1; }
  int fd = open("/dev/hwrng", O_RDONLY);
  if (fd < 0) { perror("hwrng-read: /dev/hwrng"); return 1; }
  /* No SA_RESTART: the alarm interrupts a blocked read. */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_alarm;
  sigaction(SIGALRM, &sa, NULL);
  alarm(secs);

  static char buf[65536];
  long got = 0, reads = 0;
  int rc = 0;
  long long t0 = now_ns();
  while (got < want) {
    long n = want - got < block ? want - got : block;
    long long a = now_ns();
    ssize_t r = read(fd, buf, n);
    long long b = now_ns();
    if (r < 0) {
      if (errno == EINTR && timed_out) { rc = 2; break; }
      if (errno == EINTR) continue;
      perror("hwrng-read: read");
      rc = 1;
      break;
    }
    if (r == 0) { fprintf(stderr, "hwrng-read: end of file\n"); rc = 1; break; }
    fwrite(buf, 1, r, out);
    fprintf(lat, "%lld %ld\n", b - a, (long)r);
    got += r;
    reads++;
    if (timed_out) { rc = got < want ? 2 : 0; break; }
  }
  long long t1 = now_ns();
  memset(buf, 0, sizeof buf);
  if (fclose(out) || fclose(lat)) { perror("hwrng-read: write"); rc = 1; }
  printf("bytes=%ld secs=%.6f reads=%ld\n", got, (t1 - t0) / 1e9, reads);
  return rc;
}
