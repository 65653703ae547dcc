/*
 * COM1 console of the rqemu test payload: polled 16550 output, and the "key=value " words
 * every report line is made of (payload.c and virtio_blk.c print through it).
 */
#include "console.h"
#include "io.h"

void putc_(char c)
{
    while (!(inb(0x3fd) & 0x20))
        ;
    outb(0x3f8, (u8)c);
}
void puts_(const char *s) { while (*s) putc_(*s++); }
static void puthex(u64 v)
{
    char digits[19];
    int i = 18;
    digits[i] = 0;
    do { digits[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    digits[--i] = 'x';
    digits[--i] = '0';
    puts_(&digits[i]);
}
static void putdec(u64 v)
{
    char digits[21];
    int i = 20;
    digits[i] = 0;
    do { digits[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts_(&digits[i]);
}
void kv_hex(const char *k, u64 v) { puts_(k); putc_('='); puthex(v); putc_(' '); }
void kv_dec(const char *k, u64 v) { puts_(k); putc_('='); putdec(v); putc_(' '); }
void nl(void) { putc_('\n'); }
