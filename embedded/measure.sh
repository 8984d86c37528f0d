#!/usr/bin/env bash
# Builds session-fw, device-fw, usb-fw and getrandom-fw for
# thumbv7m-none-eabi (release profile) and prints what they cost:
#   flash      = .vector_table + .text + .rodata + .data (initial values)
#   static RAM = .data + .bss + .uninit (stack not included)
#   stack      = deepest stack use seen in QEMU (only if qemu-system-arm is
#                installed): a second build with cortex-m-rt's paint-stack
#                feature runs on QEMU's netduino2 board (Cortex-M3) for a few
#                seconds; its RAM is then dumped and searched for the lowest
#                word no longer 0xCCCCCCCC.
#   state      = size_of::<Session>() / size_of::<Device>() / ... on the target,
#                read off the ELF symbol of the static that holds it
#                (MaybeUninit<T> has exactly T's size).
# session-fw is built without the `device` feature, as a host-only firmware
# would be; device-fw with it.
#
# Usage: ./measure.sh            (QEMU_SECONDS=3 by default)
#        CARGO_PROFILE_RELEASE_OPT_LEVEL=z ./measure.sh   (compare opt-levels)
# Needs: cargo with the thumbv7m-none-eabi target, readelf, od;
#        optionally qemu-system-arm (Debian: apt-get install qemu-system-arm).
set -euo pipefail
cd "$(dirname "$0")"

TARGET=thumbv7m-none-eabi
REL=target/$TARGET/release
PAINT_DIR=target/paint
QEMU_SECONDS=${QEMU_SECONDS:-3}

# --- build ---------------------------------------------------------------
cargo build --release --quiet --bin device-fw
mkdir -p target/measure
cp "$REL/device-fw" target/measure/device-fw
cargo build --release --quiet --no-default-features --bin session-fw
cp "$REL/session-fw" target/measure/session-fw
cargo build --release --quiet --features usb --bin usb-fw
cp "$REL/usb-fw" target/measure/usb-fw
cargo build --release --quiet --bin getrandom-fw
cp "$REL/getrandom-fw" target/measure/getrandom-fw

have_qemu=no
if command -v qemu-system-arm >/dev/null 2>&1; then
  have_qemu=yes
  CARGO_TARGET_DIR=$PAINT_DIR cargo build --release --quiet --features paint-stack --bin device-fw
  cp "$PAINT_DIR/$TARGET/release/device-fw" target/measure/device-fw.paint
  CARGO_TARGET_DIR=$PAINT_DIR cargo build --release --quiet --no-default-features \
    --features paint-stack --bin session-fw
  cp "$PAINT_DIR/$TARGET/release/session-fw" target/measure/session-fw.paint
  CARGO_TARGET_DIR=$PAINT_DIR cargo build --release --quiet --features usb,paint-stack --bin usb-fw
  cp "$PAINT_DIR/$TARGET/release/usb-fw" target/measure/usb-fw.paint
  CARGO_TARGET_DIR=$PAINT_DIR cargo build --release --quiet --features paint-stack --bin getrandom-fw
  cp "$PAINT_DIR/$TARGET/release/getrandom-fw" target/measure/getrandom-fw.paint
fi

# --- ELF helpers -----------------------------------------------------------
# Size in bytes of section $2 of ELF $1 (0 if absent).
section() {
  local hex
  hex=$(readelf -S -W "$1" | sed 's/^ *\[ *[0-9]*\]//' | awk -v n="$2" '$1 == n { print $5 }')
  echo $((16#${hex:-0}))
}
# Address (hex, no 0x) and size (decimal) of the first symbol matching $2.
symbol() {
  readelf -s -W "$1" | awk -v re="$2" '$8 ~ re { print $2, $3; exit }'
}
# Address of a linker symbol such as _stack_start (hex, no 0x).
linker_symbol() {
  readelf -s -W "$1" | awk -v n="$2" '$8 == n { print $2; exit }'
}
# 32-bit little-endian word at offset $2 (decimal) of file $1, in decimal.
word_at() {
  od -A n -t u4 -j "$2" -N 4 "$1" | tr -d ' '
}

# --- stack via QEMU ----------------------------------------------------------
RAM_BASE=$((16#20000000))
# Runs $1 (a paint-stack ELF) on QEMU; leaves a RAM dump in $2.
run_qemu() {
  local elf=$1 dump=$2 stack_start len
  stack_start=$((16#$(linker_symbol "$elf" _stack_start)))
  len=$((stack_start - RAM_BASE))
  rm -f "$dump"
  { sleep "$QEMU_SECONDS"
    printf 'pmemsave 0x%x %d "%s"\n' "$RAM_BASE" "$len" "$dump"
    sleep 1
    echo quit
  } | timeout $((QEMU_SECONDS + 30)) qemu-system-arm -M netduino2 -display none \
        -serial none -monitor stdio -kernel "$elf" >/dev/null 2>&1 || true
  [ -s "$dump" ]
}
# Deepest stack use in dump $2 of ELF $1, in bytes.
stack_use() {
  local elf=$1 dump=$2 end start off w
  end=$(( 16#$(linker_symbol "$elf" _stack_end) - RAM_BASE ))
  start=$(( 16#$(linker_symbol "$elf" _stack_start) - RAM_BASE ))
  # First word from the bottom of the painted area that is not paint.
  off=$(od -A d -t x4 -v -j "$end" -w4 "$dump" | awk '$2 != "cccccccc" { print $1 + 0; exit }')
  echo $(( start - ${off:-$start} ))
}
# Value of the u32 static matching $2 in the dump $3 of ELF $1.
static_value() {
  local addr
  read -r addr _ < <(symbol "$1" "$2")
  word_at "$3" $(( 16#$addr - RAM_BASE ))
}

# --- table -------------------------------------------------------------------
details=()
notes=()
row() { printf '%-13s %8s %10s %8s %8s %9s %10s %9s\n' "$@"; }
echo
opt=${CARGO_PROFILE_RELEASE_OPT_LEVEL:-$(sed -n 's/^opt-level = "\(.*\)"/\1/p' Cargo.toml)}
echo "thumbv7m-none-eabi, release profile (opt-level=$opt, lto, codegen-units=1, panic=abort)"
echo "memory.x: $(sed -n 's/^ *FLASH.*LENGTH = \(.*\)$/\1/p' memory.x) flash, $(sed -n 's/^ *RAM .*LENGTH = \(.*\)$/\1/p' memory.x) RAM"
echo
row binary flash "(.text)" "(input)" "static" "stack" "RAM total" "size_of"
row "" bytes "" "" "RAM" "(QEMU)" "" "state"
for bin in session-fw device-fw usb-fw getrandom-fw; do
  elf=target/measure/$bin
  vt=$(section "$elf" .vector_table); tx=$(section "$elf" .text)
  ro=$(section "$elf" .rodata); da=$(section "$elf" .data)
  bs=$(section "$elf" .bss); un=$(section "$elf" .uninit)
  flash=$((vt + tx + ro + da)); ram=$((da + bs + un))
  input=
  case $bin in
    session-fw) state_sym='SESSION'; state_name=Session; input=key_to_host.bin ;;
    device-fw) state_sym='DEVICE'; state_name=Device; input=host_to_key.bin ;;
    usb-fw) state_sym='CLASS'; state_name=EntropyKeyClass ;;
    getrandom-fw) state_sym='RNG'; state_name=EntropyKeyRng; input=key_to_host.bin ;;
  esac
  read -r _ state_size < <(symbol "$elf" "main_trampoline.*$state_sym")
  # The recorded conversation the firmware replays, part of .rodata
  # (usb-fw replays nothing).
  input_len=0
  if [ -n "$input" ]; then
    input_file=$(ls -t "$REL"/build/ekey-embedded-*/out/$input | head -n 1)
    input_len=$(stat -c %s "$input_file")
  fi
  stack=n/a; total=n/a
  if [ $have_qemu = yes ]; then
    dump=target/measure/$bin.ram
    if run_qemu "$elf.paint" "$dump"; then
      stack=$(stack_use "$elf.paint" "$dump")
      total=$((ram + stack))
      if [ "$bin" = session-fw ]; then
        qemu_note="$bin on QEMU: $(static_value "$elf.paint" 'sink10BLOCKS_OUT' "$dump") entropy blocks released"
      elif [ "$bin" = getrandom-fw ]; then
        qemu_note="$bin on QEMU: $(static_value "$elf.paint" 'sink10BLOCKS_OUT' "$dump") getrandom calls got the key's bytes, $(static_value "$elf.paint" 'sink16GETRANDOM_ERRORS' "$dump") failed (last error code $(static_value "$elf.paint" 'sink20GETRANDOM_LAST_ERROR' "$dump"))"
      elif [ "$bin" = usb-fw ]; then
        qemu_note="$bin on QEMU: idles (no host); stack = construction + an idle poll only, $(static_value "$elf.paint" 'sink10FRAMES_OUT' "$dump") frames"
      else
        qemu_note="$bin on QEMU: $(static_value "$elf.paint" 'sink10FRAMES_OUT' "$dump") frames sent, $(static_value "$elf.paint" 'sink8TX_COUNT' "$dump") bytes"
      fi
      notes+=("$qemu_note")
    else
      stack="qemu?"
    fi
  fi
  row "$bin" "$flash" "$tx" "$input_len" "$ram" "$stack" "$total" "$state_size"
  details+=("$bin: .vector_table $vt + .text $tx + .rodata $ro + .data $da = $flash flash; .data $da + .bss $bs + .uninit $un = $ram static RAM; size_of::<$state_name>() = $state_size")
done
echo
printf '%s\n' "${details[@]}"
if [ $have_qemu = yes ]; then
  printf '%s\n' "${notes[@]}"
else
  echo "stack: n/a (install qemu-system-arm to measure it)"
fi
echo
echo "(input) = the recorded conversation in .rodata, test scaffolding a real firmware would not carry."
echo "stack = deepest use on the paths the replay exercises, as painted words; not a bound for all paths."
