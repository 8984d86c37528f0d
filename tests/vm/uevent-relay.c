/*
 * uevent-relay: plays udevd's part in the tests/vm guest.
 *
 * nusb's hot-plug watch (and so `ekey-host run`) listens for the messages
 * udevd re-broadcasts on netlink multicast group 2, not for the kernel's own
 * uevents (group 1). The guest has no udevd, so this program forwards every
 * kernel uevent to group 2, wrapped in the header libudev-style listeners
 * check. Each forwarded event is logged on stderr ("relay: ACTION@DEVPATH").
 *
 * Built statically by tests/vm/run: gcc -static -O2 -o uevent-relay uevent-relay.c
 */
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define KERNEL_GROUP 1u
#define UDEV_GROUP 2u

/* The monitor header libudev puts in front of the properties. */
struct monitor_header {
    char prefix[8];             /* "libudev" and a NUL */
    unsigned int magic;         /* 0xfeedcafe, big-endian */
    unsigned int header_size;   /* sizeof(struct monitor_header) */
    unsigned int properties_off;
    unsigned int properties_len;
    unsigned int filter_subsystem_hash;
    unsigned int filter_devtype_hash;
    unsigned int filter_tag_bloom_hi;
    unsigned int filter_tag_bloom_lo;
};

static int netlink_socket(unsigned int groups)
{
    int fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_KOBJECT_UEVENT);
    struct sockaddr_nl addr;

    if (fd < 0) {
        perror("relay: socket");
        return -1;
    }
    memset(&addr, 0, sizeof addr);
    addr.nl_family = AF_NETLINK;
    addr.nl_groups = groups;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("relay: bind");
        close(fd);
        return -1;
    }
    return fd;
}

int main(void)
{
    static char buf[16384];
    int in = netlink_socket(KERNEL_GROUP);
    int out = netlink_socket(0);
    struct sockaddr_nl dst;

    if (in < 0 || out < 0)
        return 1;
    memset(&dst, 0, sizeof dst);
    dst.nl_family = AF_NETLINK;
    dst.nl_groups = UDEV_GROUP;
    fprintf(stderr, "relay: forwarding kernel uevents to the udev group\n");

    for (;;) {
        ssize_t n = recv(in, buf, sizeof buf, 0);
        size_t summary;
        struct monitor_header h;
        struct iovec iov[2];
        struct msghdr msg;

        if (n <= 0)
            continue;
        /* A kernel uevent is "ACTION@DEVPATH\0" then "KEY=VALUE\0" pairs;
         * udev's messages carry only the pairs. */
        summary = strnlen(buf, (size_t)n) + 1;
        if (summary >= (size_t)n)
            continue;
        memset(&h, 0, sizeof h);
        memcpy(h.prefix, "libudev", 8);
        h.magic = htonl(0xfeedcafe);
        h.header_size = sizeof h;
        h.properties_off = sizeof h;
        h.properties_len = (unsigned int)((size_t)n - summary);

        iov[0].iov_base = &h;
        iov[0].iov_len = sizeof h;
        iov[1].iov_base = buf + summary;
        iov[1].iov_len = (size_t)n - summary;
        memset(&msg, 0, sizeof msg);
        msg.msg_name = &dst;
        msg.msg_namelen = sizeof dst;
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        if (sendmsg(out, &msg, 0) < 0)
            perror("relay: sendmsg");
        else
            fprintf(stderr, "relay: %s\n", buf);
    }
}
