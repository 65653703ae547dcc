/*
 * The rqemu test payload's integer types and port I/O, shared by its C files.
 */
#ifndef RQEMU_PAYLOAD_IO_H
#define RQEMU_PAYLOAD_IO_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

#endif
