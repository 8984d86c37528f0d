#!/bin/busybox sh
# /init of the tests/vm guest (busybox ash, PID 1). Started by tests/vm/run.
#
# The guest plays both ends of a USB cable. dummy_hcd ties a gadget (device
# side) controller to a host controller; a configfs CDC-ACM gadget with the
# Entropy Key's ids (20df:0001) is the device; the software key
# (`ekey-host emulate --tty /dev/ttyGS0`) answers on the gadget's tty; and
# ekey-host on the host side reaches it through Linux's real USB stack:
# usbfs (nusb, the default) or cdc_acm's /dev/ttyACM0.
#
# Every step leaves its files in /r: NAME.out (what the host side got),
# NAME.rec (what the key sent), NAME.log / NAME.key.log (stderr), NAME.rc
# (exit codes), NAME.usb (the device as sysfs shows it). At the end /r goes
# as a tar archive to the virtio disk /dev/vda; the runner checks it on the
# CI machine. Console lines starting "VM:" are progress for humans.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /r
EKEY=/bin/ekey-host
KEYRING=/etc/keyring      # the demo key's serial and long-term key
RATE=8000                 # software key rate (bytes/s): twice a real key's (~86 frames/s, <4 kB/s)
ONLY=""                   # run only these steps (vmonly=hs,tty,hp,nu,rk,fs,egd; debugging;
                          # tls, tls-refused and vmgenid run only when named: the short guests')
VMEGD="" VMGENS=2 VMGENBYTES=192   # vmgenid: the EGD server, the generation changes to expect, feed's bytes for each
for a in $(cat /proc/cmdline); do
  case $a in vmrate=*) RATE=${a#vmrate=};; vmonly=*) ONLY=${a#vmonly=};; vmlog=*) export EKEY_LOG=${a#vmlog=};;
             vmegd=*) VMEGD=${a#vmegd=};; vmgens=*) VMGENS=${a#vmgens=};; vmgenbytes=*) VMGENBYTES=${a#vmgenbytes=};; esac
done
step() { [ -z "$ONLY" ] || echo ",$ONLY," | grep -q ",$1,"; }
named() { echo ",$ONLY," | grep -q ",$1,"; }   # steps only for guests that ask for them
G=/sys/kernel/config/usb_gadget/ekey

# Debugging knobs, from the kernel command line (EKEY_VM_APPEND=... tests/vm/run):
# vmrate=BYTES/S, vmonly=STEP,..., vmlog=debug (EKEY_LOG), vmtrace (set -x),
# vmdebug (every 5 s: where each ekey-host thread waits).
grep -q vmtrace /proc/cmdline && set -x
if grep -q vmdebug /proc/cmdline; then
  (while sleep 5; do
     for p in $(pidof ekey-host); do
       echo "DBG: $p $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-60) state=$(cut -d' ' -f3 /proc/$p/stat) wchan=$(cat /proc/$p/wchan) cpu=$(cut -d' ' -f14,15 /proc/$p/stat)"
       for t in /proc/$p/task/*; do echo "DBG:    task $(basename $t) $(cat $t/comm) wchan=$(cat $t/wchan) state=$(cut -d' ' -f3 $t/stat)"; done
     done
     ls -l /r | sed 's/^/DBG: /'
   done) &
fi

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "VM: [$(up)] $*"; }

# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s until it succeeds.
wait_for() {
  _ticks=$(($1 * 10)); shift
  while ! "$@" >/dev/null 2>&1; do
    _ticks=$((_ticks - 1)); [ $_ticks -le 0 ] && return 1
    sleep 0.1
  done
}

# ---- kernel modules: USB host + gadget stacks, virtio disk and RNG ----
M=/lib/modules
for m in usb-common usbcore configfs udc-core libcomposite u_serial usb_f_acm cdc-acm \
         virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  insmod $M/$m.ko || say "insmod $m FAILED"
done
insmod $M/dummy_hcd.ko || say "insmod dummy_hcd FAILED"   # high speed (480 Mb/s) first
mount -t configfs none /sys/kernel/config
say "init start; UDC: $(ls /sys/class/udc)"

# No /dev/random read here: the static ekey-host calls getrandom() (built
# with getrandom_backend="linux_getrandom", see run), which makes the kernel
# gather jitter entropy at once; the guest runs without any such help.

# ---- the gadget: CDC-ACM with the Entropy Key's ids ----
# The USB serial string is the key's serial, as on the product; the daemon
# keeps a re-plugged key's history under it.
mkdir $G $G/strings/0x409 $G/configs/c.1 $G/functions/acm.key
echo 0x20df > $G/idVendor
echo 0x0001 > $G/idProduct
echo RW11bGF0ZWRLZXkx > $G/strings/0x409/serialnumber
echo "ekey-host tests/vm" > $G/strings/0x409/manufacturer
echo "Entropy Key (emulated)" > $G/strings/0x409/product
ln -s $G/functions/acm.key $G/configs/c.1/

# The key's sysfs directory on the host side (empty if not enumerated).
key_dir() {
  for d in /sys/bus/usb/devices/*; do
    [ "$(cat $d/idVendor 2>/dev/null)" = 20df ] && echo $d && return 0
  done
  return 1
}
key_node() { # its usbfs node exists
  d=$(key_dir) || return 1
  test -c /dev/bus/usb/$(printf %03d $(cat $d/busnum))/$(printf %03d $(cat $d/devnum))
}
key_gone() { ! key_dir; }
plug() { # bind the gadget to the controller: the host side enumerates it
  ls /sys/class/udc > $G/UDC
  wait_for 15 key_node || say "plug: the key did not enumerate"
}
unplug() {
  echo "" > $G/UDC
  wait_for 15 key_gone || say "unplug: the key is still there"
}
usb_info() { # NAME: speed and endpoints of the key, as the host side sees them
  d=$(key_dir) || { echo "not enumerated" > /r/$1.usb; return; }
  {
    echo "speed=$(cat $d/speed)"
    for i in $d/$(basename $d):*; do
      echo "interface=$(cat $i/bInterfaceNumber) class=$(cat $i/bInterfaceClass) driver=$(basename "$(readlink $i/driver)")"
      for e in $i/ep_*; do
        echo "  ep=$(cat $e/bEndpointAddress) type=$(cat $e/type) dir=$(cat $e/direction) maxp=$(cat $e/wMaxPacketSize)"
      done
    done
  } > /r/$1.usb
}

# start_key NAME SEED: the software key on the gadget's tty, fixed noise,
# recording every block it sends to /r/NAME.rec.
start_key() {
  $EKEY emulate --tty /dev/ttyGS0 --rate $RATE --noise-seed $2 --record /r/$1.rec \
    > /dev/null 2> /r/$1.key.log &
  KEY_PID=$!
  wait_for 5 grep -q "software key" /r/$1.key.log || say "$1: the software key did not start"
}
# Unplug first: closing the gadget's tty with unsent data waits up to 15 s
# for a host that no longer reads.
stop_key() { unplug; kill $KEY_PID 2>/dev/null; wait $KEY_PID; }
show() { tail -n ${2:-20} /r/$1 2>/dev/null | sed "s|^|VM:   $1: |"; }  # FILE [LINES]

# read_step NAME BYTES [ARGS...]: `ekey-host read` on the host side.
read_step() {
  name=$1; bytes=$2; shift 2
  t0=$(up)
  timeout 90 $EKEY read -n $bytes --keyring $KEYRING --timeout 60 -o /r/$name.out "$@" 2> /r/$name.log
  echo $? > /r/$name.rc
  say "$name: read exited $(cat /r/$name.rc) after $(echo "$(up) - $t0" | bc) s"
  [ "$(cat /r/$name.rc)" = 0 ] || { show $name.log; show $name.key.log; }
}

# ---- 1. usb-highspeed: `read` over usbfs (nusb), no --device ----
if step hs; then
say "usb-highspeed"
plug
usb_info hs
start_key hs 1111111111111111111111111111111111111111111111111111111111111111
read_step hs 131072
stop_key
fi

# ---- 4. tty: `read --device /dev/ttyACM0` (cdc_acm bound) ----
if step tty; then
say "tty"
plug             # re-enumerated: cdc_acm binds again (nusb had detached it)
wait_for 10 test -c /dev/ttyACM0 || say "tty: no /dev/ttyACM0"
usb_info tty
start_key tty 4444444444444444444444444444444444444444444444444444444444444444
read_step tty 65536 --device /dev/ttyACM0
stop_key
fi

# hotplug_step NAME SEED: `ekey-host run --output /r/NAME.out` started with
# no key; plug (wait until keyed), stream 56 KiB, unplug (the loss, the
# daemon alive), plug again (keyed again), stream 56 KiB, SIGTERM.
hotplug_step() {
  HP=$1; CTL=/tmp/$HP.ctl
  start_key $HP $2
  $EKEY run --keyring $KEYRING --output /r/$HP.out --control $CTL 2> /r/$HP.log &
  DAEMON=$!
  wait_for 10 test -S $CTL || say "$HP: no control socket"
  status > /r/$HP.status0.json                              # before: no key
  for n in 1 2; do
    t0=$(up); plug
    # keyed: the daemon's status says the key is running
    if wait_for 20 running; then echo "$(echo "$(up) - $t0" | bc)" > /r/$HP.keyed$n; fi
    say "$HP: plug $n, keyed after $(cat /r/$HP.keyed$n 2>/dev/null || echo never) s"
    want=$(($(size) + 57344)); wait_for 40 grow $want     # let it stream 56 KiB more
    status > /r/$HP.status$n.json
    if [ $n = 1 ]; then
      unplug
      wait_for 10 sh -c "$EKEY status --json --control $CTL | grep -q '\"connected\": false'"
      sleep 1
      kill -0 $DAEMON && echo alive > /r/$HP.alive
      status > /r/$HP.status-unplugged.json
      say "$HP: unplugged at $(size) bytes; daemon $(cat /r/$HP.alive 2>/dev/null || echo GONE)"
    fi
  done
  kill -TERM $DAEMON; wait $DAEMON; echo $? > /r/$HP.rc
  stop_key
  [ -s /r/$HP.keyed1 ] && [ -s /r/$HP.keyed2 ] && [ "$(cat /r/$HP.rc)" = 0 ] ||
    { show $HP.log 40; show $HP.key.log; }
  say "$HP: daemon stopped (exit $(cat /r/$HP.rc)), $(size) bytes"
}
status() { $EKEY status --json --control $CTL; }
running() { status | grep -q '"running": true'; }
size() { stat -c %s /r/$HP.out 2>/dev/null || echo 0; }
grow() { [ $(size) -ge $1 ]; }

# ---- 3. hotplug: hot-plug events (nusb's watch, fed by the relay) ----
if step hp; then
say "hotplug"
/bin/uevent-relay 2> /r/relay.log &       # udevd's part, for nusb's hot-plug watch
RELAY=$!
hotplug_step hp 3333333333333333333333333333333333333333333333333333333333333333
kill $RELAY; wait $RELAY
[ -s /r/hp.keyed1 ] && [ -s /r/hp.keyed2 ] || show relay.log
fi

# ---- 6. hotplug-no-udev: no relay, no udevd: the daemon's USB rescan ----
if step nu; then
say "hotplug-no-udev"
pidof uevent-relay udevd systemd-udevd > /r/nu.listeners   # empty: nobody sends udev events
hotplug_step nu 6666666666666666666666666666666666666666666666666666666666666666
fi

# ---- 7. usb-rekey: `rekey` over USB while the daemon holds the key ----
# The daemon lets go of the key (its USB interface), `rekey` claims it and
# sets a new long-term key, the daemon claims it again and keys it with
# the new key from the rewritten keyring.
if step rk; then
say "usb-rekey"
HP=rk; CTL=/tmp/rk.ctl
cp $KEYRING /tmp/rk.keyring; chmod 600 /tmp/rk.keyring
echo "TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU2T" > /tmp/rk.master
start_key rk 7777777777777777777777777777777777777777777777777777777777777777
plug
$EKEY run --keyring /tmp/rk.keyring --output /r/rk.out --control $CTL 2> /r/rk.log &
DAEMON=$!
wait_for 20 running || say "rk: the daemon did not key the key"
wait_for 30 grow 16384
status > /r/rk.status1.json
t0=$(up)
timeout 60 $EKEY rekey --master-key-file /tmp/rk.master --keyring /tmp/rk.keyring \
  --control $CTL > /r/rk.rekey.out 2> /r/rk.rekey.log
echo $? > /r/rk.rekey.rc
say "rk: rekey exited $(cat /r/rk.rekey.rc) after $(echo "$(up) - $t0" | bc) s"
connects2() { status | grep -q '"connects": 2'; }
wait_for 30 connects2 && wait_for 30 running && echo "$(echo "$(up) - $t0" | bc)" > /r/rk.back
after=$(($(size) + 16384))
wait_for 40 grow $after
status > /r/rk.status2.json
cp /tmp/rk.keyring /r/rk.keyring
kill -TERM $DAEMON; wait $DAEMON; echo $? > /r/rk.rc
stop_key
say "rk: daemon stopped (exit $(cat /r/rk.rc)), $(size) bytes"
[ -s /r/rk.back ] || { show rk.log 40; show rk.rekey.log; show rk.key.log; }
fi

# ---- 2. usb-fullspeed: dummy_hcd at 12 Mb/s (64-byte bulk packets) ----
if step fs; then
say "usb-fullspeed"
rmmod dummy_hcd && insmod $M/dummy_hcd.ko is_high_speed=0 || say "full speed: reload dummy_hcd FAILED"
plug
usb_info fs
start_key fs 2222222222222222222222222222222222222222222222222222222222222222
read_step fs 131072
stop_key
fi

# hwrng_read NAME SECONDS: the guest's /dev/hwrng (virtio-rng, fed over
# rng-egd by the CI machine's daemon): at most 4096 bytes to /r/NAME.bin,
# giving up after SECONDS; /r/NAME.current (the hwrng in use), /r/NAME.rc
# (timeout's exit code: 0 = all read), /r/NAME.secs (how long it took).
hwrng_read() {
  insmod $M/virtio-rng.ko || say "insmod virtio-rng FAILED"
  wait_for 10 test -c /dev/hwrng
  cat /sys/class/misc/hw_random/rng_current > /r/$1.current 2>&1
  t0=$(up)
  timeout $2 head -c 4096 /dev/hwrng > /r/$1.bin
  echo $? > /r/$1.rc
  echo "$(up) - $t0" | bc > /r/$1.secs
  say "$1: $(stat -c %s /r/$1.bin) bytes from $(cat /r/$1.current) in $(cat /r/$1.secs) s (exit $(cat /r/$1.rc))"
  [ -s /r/$1.bin ] && { say "$1: the first of them:"; hexdump -C /r/$1.bin | head -4; }
}

# ---- 5. guest-egd: /dev/hwrng is virtio-rng, fed by the CI machine's daemon ----
if step egd; then
say "guest-egd"
hwrng_read hwrng 60
fi

# ---- egd-tls: the same over TLS (QEMU's tls-creds-x509 as the client) ----
# Each in a guest of its own (tests/vm/run boots them with vmonly=tls or
# vmonly=tls-refused): the one with a certificate of the daemon's client CA
# reads 4096 bytes; the one whose certificate the daemon must refuse (another
# CA's) may read for 10 s and must get nothing.
if named tls; then
say "egd-tls"
hwrng_read tls 60
sleep 1     # connected a little longer: the runner's status polls see what it was served
fi
if named tls-refused; then
say "egd-tls (a certificate of another CA)"
hwrng_read tls-refused 10
fi

# ---- vmgenid: a new VM generation ID makes feed fetch fresh bytes at once ----
# In a guest of its own (vmonly=vmgenid) with -device vmgenid and user
# networking: `ekey-host feed` reads the CI machine's daemon (vmegd=: QEMU's
# guestfwd to the daemon's EGD port), discarding the bytes (--test-discard:
# the emulator's bytes are not credited to this kernel), idle once it has
# its initial fill (--interval 1h). tests/vm/run (vmgenid-host.py) sees it
# idle at the daemon, saves this guest's state and restores it into a new
# QEMU with another guid, vmgens= times; each time the kernel's vmgenid
# driver takes the new ID (add_vmfork_randomness: "crng reseeded due to
# virtual machine fork" in the kernel log) and may send a NEW_VMGENID=1
# uevent, on which feed fetches vmgenbytes= bytes. Here: wait until the
# kernel has logged as many new IDs, then 3 s (the runner watches the daemon
# meanwhile), SIGUSR1 (a summary), SIGTERM. /r/vmgenid.device: the ACPI
# device and its driver; /r/vmgenid.uevents: every kernel uevent meanwhile
# (busybox uevent: SEQNUM ACTION DEVPATH [NEW_VMGENID=...]).
if named vmgenid; then
say "vmgenid"
V=/sys/bus/acpi/devices/QEMUVGID:00
{ echo "device=$(ls -d $V 2>/dev/null)"
  echo "driver=$(basename "$(readlink $V/driver)" 2>/dev/null)"
  echo "status=$(cat $V/status 2>/dev/null)"
} > /r/vmgenid.device
for m in failover net_failover virtio_net; do insmod $M/$m.ko || say "insmod $m FAILED"; done
wait_for 10 test -e /sys/class/net/eth0 || say "vmgenid: no eth0"
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || say "vmgenid: eth0 not configured"
ip addr show eth0 > /r/vmgenid.net 2>&1
# A running system's CRNG is initialised; only then does the kernel reseed
# it (and say so) on a new VM generation ID. Nothing here has asked for
# random bytes yet: a blocking read makes the kernel gather jitter entropy.
t0=$(up)
timeout 30 head -c 1 /dev/random > /dev/null || say "vmgenid: /dev/random did not become ready"
say "vmgenid: the kernel's CRNG is ready ($(echo "$(up) - $t0" | bc) s)"
uevent sh -c 'echo "$SEQNUM $ACTION $DEVPATH${NEW_VMGENID+ NEW_VMGENID=$NEW_VMGENID}"' \
  > /r/vmgenid.uevents 2>&1 &
UEVENTS=$!
$EKEY feed --egd "$VMEGD" --test-discard --interval 1h --bytes-per-interval 64 \
  --on-vmgenid-bytes $VMGENBYTES --status-interval 0 --retry-max 2s 2> /r/vmgenid.feed.log &
FEED=$!
forks() { dmesg | grep -c "crng reseeded due to virtual machine fork"; }
all_forks() { [ "$(forks)" -ge $VMGENS ]; }
events() { grep -c "new VM generation ID" /r/vmgenid.feed.log; }
if wait_for 30 grep -q "mixing in" /r/vmgenid.feed.log; then
  say "vmgenid: feed ready (filled, topping up hourly); waiting for $VMGENS new generation IDs"
  wait_for 40 all_forks
else
  say "vmgenid: feed did not fill"
fi
sleep 3
say "vmgenid: the kernel took $(forks) new VM generation IDs; feed saw $(events)"
kill -USR1 $FEED; sleep 0.3
kill -TERM $FEED; wait $FEED; echo $? > /r/vmgenid.feed.rc
kill $UEVENTS; wait $UEVENTS 2>/dev/null
show vmgenid.feed.log 6
show vmgenid.uevents 6
fi

# ---- vhost-user-rng: /dev/hwrng through vhost-user-rng-pci and through rng-egd ----
# In a guest of its own (tests/vm/run boots it with vmonly=vu, and after a
# kill -9 of its QEMU the same guest again with vmonly=vu2): one
# virtio-rng-pci (rng-egd, the daemon's EGD TCP port) at PCI slot 10 and one
# vhost-user-rng-pci (the daemon's --vhost-user-rng socket) at slot 11, both
# virtio entropy devices with the same driver. Autoprobe is off, so each is
# bound by hand: rng-egd's first, then vhost-user's, and the name each one
# got is the one that appears in rng_available (/r/vu.devices). The kernel
# kernel's hwrng thread (/r/vu.threads) competes only until the CRNG is
# ready: that is waited for first. Each device in turn becomes rng_current and
# gives 64 KiB to hwrng-read, in 64-byte reads, each timed (/r/vu-NAME.bin,
# /r/vu-NAME.lat, /r/vu-NAME.summary). vu2: vhost-user's device only, 4096
# bytes. Then the results go to the disk, and the guest waits to be killed.
HW=/sys/class/misc/hw_random
vu_bind() { # KIND SLOT: binds the virtio device at PCI slot SLOT to virtio_rng
  for d in /sys/bus/virtio/devices/virtio*; do
    pci=$(readlink -f $d/..)
    [ "$(basename $pci)" = "0000:00:$2.0" ] || continue
    before=" $(cat $HW/rng_available) "
    echo $(basename $d) > /sys/bus/virtio/drivers/virtio_rng/bind || say "vu: bind $(basename $d) FAILED"
    new=""
    for n in $(cat $HW/rng_available); do
      case "$before" in *" $n "*) ;; *) new=$n;; esac
    done
    echo "$1 $(basename $d) $(basename $pci) $(cat $pci/vendor):$(cat $pci/device) $new" >> /r/vu.devices
    return 0
  done
  echo "$1 none 0000:00:$2.0 none none" >> /r/vu.devices
}
vu_name() { awk -v k=$1 '$1 == k { print $5 }' /r/vu.devices; }
vu_read() { # KIND BYTES: KIND's device as rng_current, BYTES read in 64-byte reads
  n=$(vu_name $1)
  echo $n > $HW/rng_current || say "vu: cannot select $n"
  cat $HW/rng_current > /r/vu-$1.current
  hwrng-read /r/vu-$1.bin /r/vu-$1.lat $2 64 30 > /r/vu-$1.summary 2> /r/vu-$1.err
  echo $? > /r/vu-$1.rc
  say "vu: $1 ($(cat /r/vu-$1.current)): $(cat /r/vu-$1.summary) (exit $(cat /r/vu-$1.rc))"
}
if named vu || named vu2; then
say "vhost-user-rng"
echo 0 > /sys/bus/virtio/drivers_autoprobe
insmod $M/virtio-rng.ko || say "insmod virtio-rng FAILED"
: > /r/vu.devices
named vu && vu_bind rng-egd 10
vu_bind vhost-user 11
cat /sys/module/rng_core/parameters/default_quality > /r/vu.quality 2>&1
cat $HW/rng_available > /r/vu.available
ps -o pid,comm > /r/vu.ps 2>&1 || ps > /r/vu.ps 2>&1
grep -l '^hwrng$' /proc/[0-9]*/comm > /r/vu.threads 2>/dev/null
sed 's/^/VM:   /' /r/vu.devices
# Until the CRNG is ready the kernel's hwrng thread pulls from the current
# device without pause; once it is, once a minute (add_hwgenerator_randomness):
# so wait for it (a blocking read) before timing anything.
t0=$(up)
timeout 30 head -c 1 /dev/random > /dev/null || say "vu: /dev/random did not become ready"
echo "$(up) - $t0" | bc > /r/vu.crng-wait
if named vu; then
  vu_read rng-egd 65536
  vu_read vhost-user 65536
else
  vu_read vhost-user 4096
fi
fi

# ---- hand the results to the runner ----
dmesg > /r/dmesg.txt
tar -c -f /dev/vda -C /r . && sync && say "results written"
# vhost-user-rng's guests wait here for tests/vm/run's kill -9 of QEMU.
if named vu || named vu2; then sleep 600; fi
poweroff -f
