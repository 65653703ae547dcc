/*
 * The rqemu test payload's COM1 console (console.c): report lines are made of
 * "key=value " words.
 */
#ifndef RQEMU_PAYLOAD_CONSOLE_H
#define RQEMU_PAYLOAD_CONSOLE_H

#include "io.h"

void putc_(char c);
void puts_(const char *s);
void kv_hex(const char *k, u64 v);
void kv_dec(const char *k, u64 v);
void nl(void);

#endif
