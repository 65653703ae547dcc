/*
 * Entry of the rqemu test payload.
 *
 * _start: Linux 64-bit boot protocol entry (long mode, identity-mapped paging set up by
 * the VMM, RSI = boot_params). Placed at 0x100200 so that the same code works as an ELF
 * (entry = e_entry) and inside a bzImage-like blob (entry = code32_start + 0x200).
 */
    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    mov     %rsi, %rdi          /* boot_params */
    xor     %esi, %esi          /* not PVH */
    call    payload_main
1:  hlt
    jmp     1b

    .section .bss
    .align 16
stack:
    .skip 16384
    .globl stack_top
stack_top:
