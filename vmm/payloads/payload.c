/*
 * rqemu test payload: a freestanding 64-bit guest that inspects what the VMM handed it
 * (boot_params or PVH start info, e820, command line, initrd, ACPI tables, CPUID) and
 * reports on COM1, then ends the way the command line's "mode=" asks:
 *   poweroff   ACPI S5 through the FADT's sleep control register (MMIO)
 *   acpireset  the FADT's reset register
 *   i8042      0xFE to port 0x64
 *   triple     load an empty IDT and execute ud2 -> triple fault
 *   halt       cli; hlt forever (for the benchmark)
 *   virtio     drive the first virtio-blk window (virtio_blk.c), then power off
 *   portloop   time PORTLOOP_N reads of CMOS port 0x71 with the TSC, print min/p50/p99/max
 *              cycles, then power off (the forwarding benchmark)
 *   button     waits for the ACPI power button (GED event register), then powers off
 *   ticks      forever: every 2000 CMOS reads print "tick k=K sec=S tsc=T" (daemon
 *              restart and API pause tests)
 * Every line is "key value..." so tests can check them (console.c prints them). Built by
 * vmm/tests with gcc from start.S (+ start_pvh.S), payload.c, console.c and virtio_blk.c
 * (headers: io.h, console.h, virtio_blk.h; no two files use each other).
 */
#include "console.h"
#include "io.h"
#include "virtio_blk.h"

static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }

static u8 rd8(u64 a) { return *(volatile u8 *)a; }
static u32 rd32(u64 a) { return *(volatile u32 *)a; }
static u64 rd64(u64 a) { return *(volatile u64 *)a; }

static int memeq(u64 a, const char *s, int n)
{
    for (int i = 0; i < n; i++)
        if (rd8(a + i) != (u8)s[i])
            return 0;
    return 1;
}
static u8 sum(u64 a, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s += rd8(a + i);
    return s;
}

static const char *cmdline;
static int has_word(const char *w)
{
    const char *p = cmdline;
    if (!p) return 0;
    while (*p) {
        const char *a = p, *b = w;
        while (*b && *a == *b) { a++; b++; }
        if (!*b && (*a == ' ' || *a == 0)) return 1;
        while (*p && *p != ' ') p++;
        while (*p == ' ') p++;
    }
    return 0;
}

static u64 sleep_ctl, reset_reg;
static u8 reset_val;
static int bad_checksums;

static void parse_madt(u64 t)
{
    u32 len = rd32(t + 4);
    u32 lapics = 0, isos = 0, nmis = 0;
    u64 ioapic = 0;
    for (u32 off = 44; off + 2 <= len;) {
        u8 type = rd8(t + off), l = rd8(t + off + 1);
        if (l < 2) break;
        if (type == 0 && (rd32(t + off + 4) & 1)) lapics++;
        if (type == 1) ioapic = rd32(t + off + 4);
        if (type == 2) isos++;
        if (type == 4) nmis++;
        off += l;
    }
    puts_("madt "); kv_dec("lapics", lapics); kv_hex("ioapic", ioapic); kv_dec("isos", isos);
    kv_dec("nmis", nmis); kv_hex("lapic_addr", rd32(t + 36)); nl();
}

static void parse_dsdt(u64 t)
{
    u32 len = rd32(t + 4), lnro = 0, com = 0, s5 = 0;
    if (sum(t, len)) bad_checksums++;
    for (u32 i = 36; i + 8 <= len; i++) {
        if (memeq(t + i, "LNRO0005", 8)) lnro++;
        if (rd32(t + i) == 0x0105d041) com++; /* EISAID PNP0501 */
        if (memeq(t + i, "_S5_", 4)) s5++;
    }
    puts_("dsdt "); kv_dec("lnro0005", lnro); kv_dec("pnp0501", com); kv_dec("s5", s5); nl();
}

static void parse_fadt(u64 t)
{
    u64 dsdt = rd64(t + 140);
    if (!dsdt) dsdt = rd32(t + 40);
    u32 flags = rd32(t + 112);
    reset_reg = rd64(t + 120);
    reset_val = rd8(t + 128);
    sleep_ctl = rd64(t + 248);
    puts_("fadt "); kv_dec("hw_reduced", (flags >> 20) & 1); kv_hex("sleep_ctl", sleep_ctl);
    kv_hex("reset_reg", reset_reg); nl();
    parse_dsdt(dsdt);
}

static void parse_acpi(u64 bp_rsdp)
{
    u64 found = 0;
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (memeq(a, "RSD PTR ", 8) && sum(a, 20) == 0) { found = a; break; }
    puts_("rsdp "); kv_hex("scan", found); kv_hex("given", bp_rsdp); nl();
    u64 rsdp = bp_rsdp ? bp_rsdp : found;
    if (!rsdp || sum(rsdp, 36)) { puts_("rsdp bad\n"); return; }
    u64 xsdt = rd64(rsdp + 24);
    u32 xlen = rd32(xsdt + 4);
    if (!memeq(xsdt, "XSDT", 4) || sum(xsdt, xlen)) { puts_("xsdt bad\n"); return; }
    u32 n = (xlen - 36) / 8;
    puts_("xsdt "); kv_dec("entries", n); nl();
    for (u32 i = 0; i < n; i++) {
        u64 t = rd64(xsdt + 36 + 8 * i);
        if (sum(t, rd32(t + 4))) bad_checksums++;
        if (memeq(t, "APIC", 4)) parse_madt(t);
        if (memeq(t, "FACP", 4)) parse_fadt(t);
    }
    puts_("acpi "); kv_dec("bad_checksums", bad_checksums); nl();
}

struct e820 { u64 addr, size; u32 type; } __attribute__((packed));

static void report_memory_map(u64 table, u32 n, u32 stride)
{
    u64 ram = 0, top = 0;
    if (n > 128) { puts_("mem bad-count\n"); return; }
    for (u32 i = 0; i < n; i++) {
        u64 e = table + (u64)i * stride;
        u64 addr = rd64(e), size = rd64(e + 8);
        u32 type = rd32(e + 16);
        puts_("e820 "); kv_hex("addr", addr); kv_hex("size", size); kv_dec("type", type); nl();
        if (type == 1) { ram += size; if (addr + size > top) top = addr + size; }
    }
    puts_("mem "); kv_dec("entries", n); kv_hex("ram", ram); kv_hex("top", top); nl();
}

static void report_initrd(u64 addr, u64 size)
{
    u32 s = 0;
    for (u64 i = 0; i < size; i++) s = s * 31 + rd8(addr + i);
    puts_("initrd "); kv_hex("addr", addr); kv_dec("size", size); kv_hex("hash", s); nl();
}

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static void report_cpu(void)
{
    u32 a, b, c, d;
    char sig[13];
    cpuid(1, 0, &a, &b, &c, &d);
    u32 hv = c >> 31, apic = b >> 24;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    *(u32 *)&sig[0] = b; *(u32 *)&sig[4] = c; *(u32 *)&sig[8] = d; sig[12] = 0;
    puts_("cpu "); kv_dec("hv", hv); kv_dec("apic_id", apic); puts_("sig="); puts_(sig); putc_(' ');
    kv_dec("lapic_id", mmio_read32(0xfee00020) >> 24);
    mmio_write32(0xfec00000, 1); /* IOAPIC version register */
    kv_hex("ioapic_ver", mmio_read32(0xfec00010));
    nl();
}

static u8 bcd(u8 v) { return (u8)((v >> 4) * 10 + (v & 15)); }
static u8 cmos(u8 r) { outb(0x70, r); return inb(0x71); }

static void report_devices(void)
{
    u32 virt = 0;
    for (int i = 0; i < 8; i++)
        if (mmio_read32(0xd0000000UL + 0x1000UL * i) == 0x74726976 &&
            mmio_read32(0xd0000000UL + 0x1000UL * i + 4) == 2)
            virt++;
    puts_("virtio "); kv_dec("magic_ok", virt); nl();
    u8 b = cmos(0x0b);
    u8 y = cmos(0x09), c = cmos(0x32);
    if (!(b & 4)) { y = bcd(y); c = bcd(c); }
    puts_("rtc "); kv_dec("year", (u64)c * 100 + y); kv_hex("status_d", cmos(0x0d)); nl();
    /* rep outsb: several bytes in one PIO exit. */
    static const char msg[] = "repouts ok\n";
    u64 n = sizeof(msg) - 1;
    const char *p = msg;
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(0x3f8) : "memory");
}

struct idt_ptr { u16 limit; u64 base; } __attribute__((packed));

static inline u64 rdtsc_ordered(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}

#define PORTLOOP_N 20000
static u64 samples[PORTLOOP_N];

static void shellsort(u64 *a, u32 n)
{
    static const u32 gaps[] = {4711, 1750, 701, 301, 132, 57, 23, 10, 4, 1};
    for (u32 g = 0; g < sizeof(gaps) / sizeof(gaps[0]); g++) {
        u32 gap = gaps[g];
        for (u32 i = gap; i < n; i++) {
            u64 v = a[i];
            u32 j = i;
            while (j >= gap && a[j - gap] > v) { a[j] = a[j - gap]; j -= gap; }
            a[j] = v;
        }
    }
}

/* One forwarded (or in-VMM) register read per sample, timed from inside the guest. */
static void portloop(void)
{
    outb(0x70, 0x0a);
    for (u32 i = 0; i < 1000; i++) /* warm up */
        (void)inb(0x71);
    for (u32 i = 0; i < PORTLOOP_N; i++) {
        u64 t0 = rdtsc_ordered();
        (void)inb(0x71);
        samples[i] = rdtsc_ordered() - t0;
    }
    u64 t0 = rdtsc_ordered(), t1 = rdtsc_ordered();
    shellsort(samples, PORTLOOP_N);
    puts_("portloop "); kv_dec("n", PORTLOOP_N); kv_dec("min", samples[0]);
    kv_dec("p50", samples[PORTLOOP_N / 2]); kv_dec("p99", samples[PORTLOOP_N * 99 / 100]);
    kv_dec("max", samples[PORTLOOP_N - 1]); kv_dec("tsc_overhead", t1 - t0); nl();
}

static void ticks(void)
{
    for (u64 k = 0;; k++) {
        u8 sec = 0;
        for (u32 i = 0; i < 2000; i++)
            sec = cmos(0x00);
        puts_("tick "); kv_dec("k", k); kv_dec("sec", sec); kv_dec("tsc", rdtsc_ordered()); nl();
    }
}

static void finish(void)
{
    if (has_word("mode=virtio")) {
        virtio_blk_test();
        puts_("action poweroff\n");
        mmio_write8(sleep_ctl, (5 << 2) | (1 << 5));
    } else if (has_word("mode=portloop")) {
        portloop();
        puts_("action poweroff\n");
        mmio_write8(sleep_ctl, (5 << 2) | (1 << 5));
    } else if (has_word("mode=ticks")) {
        ticks();
    } else if (has_word("mode=button")) {
        /* Waits for the ACPI power button: the GED's read-to-clear event register
         * (0xc0001000, see vmm/src/acpi/ged.rs) shows bit 3 once the host pressed it. */
        puts_("action button-wait\n");
        u32 ev;
        while (!((ev = rd32(0xc0001000)) & 8))
            __asm__ volatile("pause");
        puts_("button "); kv_hex("events", ev); kv_hex("after", rd32(0xc0001000)); nl();
        puts_("action poweroff\n");
        mmio_write8(sleep_ctl, (5 << 2) | (1 << 5));
    } else if (has_word("mode=poweroff")) {
        puts_("action poweroff\n");
        mmio_write8(sleep_ctl, (5 << 2) | (1 << 5));
    } else if (has_word("mode=acpireset")) {
        puts_("action acpireset\n");
        mmio_write8(reset_reg, reset_val);
    } else if (has_word("mode=i8042")) {
        puts_("action i8042\n");
        outb(0x64, 0xfe);
    } else if (has_word("mode=triple")) {
        puts_("action triple\n");
        struct idt_ptr z = {0, 0};
        __asm__ volatile("lidt %0; ud2" ::"m"(z)); /* #UD -> #DF -> shutdown */
    } else if (has_word("mode=halt")) {
        puts_("action halt\n");
        for (;;) __asm__ volatile("cli; hlt");
    }
    puts_("action none-taken\n");
    for (;;) __asm__ volatile("cli; hlt");
}

/* bp: boot_params (Linux entry) or hvm_start_info (PVH entry, pvh != 0). */
void payload_main(u64 bp, u64 pvh)
{
    puts_("rqemu-payload start\n");
    u64 rsdp;
    if (!pvh) {
        cmdline = (const char *)(u64)rd32(bp + 0x228);
        puts_("boot linux64 "); kv_hex("bp", bp); kv_hex("loader", rd8(bp + 0x210));
        kv_dec("hdrs", rd32(bp + 0x202) == 0x53726448); kv_hex("loadflags", rd8(bp + 0x211)); nl();
        rsdp = rd64(bp + 0x70);
        report_memory_map(bp + 0x2d0, rd8(bp + 0x1e8), 20);
        if (rd32(bp + 0x21c))
            report_initrd(rd32(bp + 0x218) | ((u64)rd32(bp + 0xc0) << 32),
                          rd32(bp + 0x21c) | ((u64)rd32(bp + 0xc4) << 32));
    } else {
        /* hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
         * cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries. */
        cmdline = (const char *)rd64(bp + 24);
        puts_("boot pvh "); kv_hex("magic", rd32(bp)); kv_dec("version", rd32(bp + 4)); nl();
        rsdp = rd64(bp + 32);
        report_memory_map(rd64(bp + 40), rd32(bp + 48), 24);
        if (rd32(bp + 12)) {
            u64 m = rd64(bp + 16);
            report_initrd(rd64(m), rd64(m + 8));
        }
    }
    puts_("cmdline "); puts_(cmdline ? cmdline : ""); nl();
    report_cpu();
    parse_acpi(rsdp);
    report_devices();
    finish();
}
