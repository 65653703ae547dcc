/*
 * Minimal virtio-mmio (v2) block driver for the rqemu test payload ("mode=virtio").
 *
 * Finds the first window with DeviceID 2, negotiates VERSION_1 only, sets up queue 0 in
 * static memory (identity mapped), routes the window's GSI through the IOAPIC to vector
 * 0x30 and waits (interrupts on, bounded spin) for both the used ring update and the
 * completion interrupt, so the kick (QueueNotify -> ioeventfd) and the completion
 * (call eventfd -> irqfd -> IOAPIC -> LAPIC) paths are both exercised.
 * Writes sector 2 with a known pattern, reads sector 3 (prepared by the host) and prints:
 *   vblk window=<i> irqs=<n> write=<status> read=<status> hash=<hash of sector 3>
 */
#include "console.h"
#include "io.h"
#include "virtio_blk.h"

#define WIN(i) (0xd0000000UL + 0x1000UL * (i))
#define QS 8

struct desc { u64 addr; u32 len; u16 flags, next; };
static struct desc descs[QS] __attribute__((aligned(16)));
static struct { u16 flags, idx, ring[QS], event; } avail __attribute__((aligned(2)));
static struct { u16 flags, idx; struct { u32 id, len; } ring[QS]; u16 event; } used
    __attribute__((aligned(4)));
static struct { u32 type, reserved; u64 sector; } hdr;
static u8 buf[512] __attribute__((aligned(512)));
static volatile u8 status_byte;
static u64 idt[512] __attribute__((aligned(16)));
volatile u32 irq_count;

extern char irq_stub[], spurious_stub[];
__asm__(
    ".text\n"
    "irq_stub:\n"
    "  push %rax\n"
    "  lock incl irq_count(%rip)\n"
    "  mov $0xfee000b0, %rax\n"
    "  movl $0, (%rax)\n"
    "  pop %rax\n"
    "  iretq\n"
    "spurious_stub:\n"
    "  iretq\n");

static u32 rd(u64 a) { return *(volatile u32 *)a; }
static void wr(u64 a, u32 v) { *(volatile u32 *)a = v; }

static void set_gate(int vec, void *fn)
{
    u64 off = (u64)fn;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    idt[vec * 2] = (off & 0xffff) | ((u64)cs << 16) | (0x8eUL << 40) | ((off >> 16 & 0xffff) << 48);
    idt[vec * 2 + 1] = off >> 32;
}

static void setup_interrupts(u32 gsi)
{
    struct { u16 limit; u64 base; } __attribute__((packed)) p = {sizeof(idt) - 1, (u64)idt};
    for (int v = 32; v < 256; v++)
        set_gate(v, spurious_stub);
    set_gate(0x30, irq_stub);
    __asm__ volatile("lidt %0" ::"m"(p));
    outb(0x21, 0xff); /* mask both 8259s */
    outb(0xa1, 0xff);
    wr(0xfee000f0, 0x1ff); /* LAPIC enable, spurious vector 0xff */
    wr(0xfec00000, 0x10 + 2 * gsi + 1);
    wr(0xfec00010, 0); /* destination APIC ID 0 */
    wr(0xfec00000, 0x10 + 2 * gsi);
    wr(0xfec00010, 0x30); /* fixed, physical, edge, active high, unmasked */
}

static u8 submit(u32 type, u64 sector, u64 base)
{
    hdr.type = type;
    hdr.sector = sector;
    status_byte = 0xff;
    descs[0] = (struct desc){(u64)&hdr, 16, 1, 1};
    descs[1] = (struct desc){(u64)buf, 512, (u16)(type == 0 ? 3 : 1), 2};
    descs[2] = (struct desc){(u64)&status_byte, 1, 2, 0};
    u16 seen = used.idx;
    u32 irqs = irq_count;
    avail.ring[avail.idx % QS] = 0;
    __asm__ volatile("mfence" ::: "memory");
    avail.idx++;
    __asm__ volatile("mfence" ::: "memory");
    wr(base + 0x50, 0); /* QueueNotify: ioeventfd */
    /* Wait for the used ring AND the completion interrupt (irqfd), bounded so that a lost
     * interrupt shows up as "timeout" instead of a hang. */
    for (u64 spins = 0;; spins++) {
        if (*(volatile u16 *)&used.idx != seen && irq_count != irqs)
            break;
        if (spins > (1UL << 30)) {
            puts_("vblk timeout "); kv_dec("used_changed", *(volatile u16 *)&used.idx != seen);
            kv_dec("irqs", irq_count - irqs); puts_("\n");
            return 0xee;
        }
        __asm__ volatile("pause" ::: "memory");
    }
    return status_byte;
}

void virtio_blk_test(void)
{
    int win = -1;
    for (int i = 0; i < 8; i++)
        if (rd(WIN(i)) == 0x74726976 && rd(WIN(i) + 8) == 2) { win = i; break; }
    if (win < 0) { puts_("vblk none\n"); return; }
    u64 b = WIN(win);
    wr(b + 0x70, 0);
    wr(b + 0x70, 1 | 2);
    wr(b + 0x24, 1); wr(b + 0x20, 1); /* VIRTIO_F_VERSION_1 */
    wr(b + 0x24, 0); wr(b + 0x20, 0);
    wr(b + 0x70, 1 | 2 | 8);
    if (!(rd(b + 0x70) & 8)) { puts_("vblk features-rejected\n"); return; }
    wr(b + 0x30, 0);
    wr(b + 0x38, QS);
    wr(b + 0x80, (u32)(u64)descs); wr(b + 0x84, 0);
    wr(b + 0x90, (u32)(u64)&avail); wr(b + 0x94, 0);
    wr(b + 0xa0, (u32)(u64)&used); wr(b + 0xa4, 0);
    wr(b + 0x44, 1);
    setup_interrupts(16 + (u32)win);
    __asm__ volatile("sti");
    wr(b + 0x70, 1 | 2 | 8 | 4);
    if (rd(b + 0x70) & 0x40) { puts_("vblk needs-reset\n"); return; }
    for (int i = 0; i < 512; i++)
        buf[i] = (u8)("rqemu-virtio-payload"[i % 20]);
    u8 ws = submit(1, 2, b);
    for (int i = 0; i < 512; i++)
        buf[i] = 0;
    u8 rs = submit(0, 3, b);
    u32 h = 0;
    for (int i = 0; i < 512; i++)
        h = h * 31 + buf[i];
    puts_("vblk "); kv_dec("window", (u64)win); kv_dec("irqs", irq_count);
    kv_dec("write", ws); kv_dec("read", rs); kv_hex("hash", h); puts_("\n");
}
