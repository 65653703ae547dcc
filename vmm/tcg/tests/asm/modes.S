/* A STARTUP-IPI target for the legacy-mode system test (tests/system/modes.rs): real mode
 * (16-bit addressing, near call/ret, pushf/popf, loop, rep movsb, INT through the vector
 * table), protected mode (32-bit stack, call, INT through a 32-bit IDT), then long mode
 * (PAE, CR3, EFER.LME, CR0.PG, far jump to a 64-bit code segment), like Linux's
 * trampoline_64.S. Linked at 0 and loaded at 0x8000 (vector 8): real-mode offsets are the
 * symbols, linear addresses are PA(symbol). Results go to the `res_*` words. */
#define PA(x) ((x) + 0x8000)

        .text
        .code16
        .globl start
start:
        cli
        ljmpw   $0x0800, $real
real:
        mov     %cs, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $stack16_top, %sp
        /* 16-bit addressing: [bx + si + disp8]. */
        mov     $data16, %bx
        mov     $2, %si
        movw    4(%bx,%si), %ax
        mov     %ax, res_addr
        /* Near call and return, pushf/popf, bp frame. */
        call    func16
        /* LOOP counts CX. */
        mov     $5, %cx
        xor     %dx, %dx
1:      add     %cx, %dx
        loop    1b
        mov     %dx, res_loop
        /* REP MOVSB from DS:SI to ES:DI. */
        mov     $data16, %si
        mov     $copy16, %di
        mov     $8, %cx
        cld
        rep movsb
        /* INT 0x40 through the real-mode vector table at 0. */
        xor     %ax, %ax
        mov     %ax, %es
        movw    $int16, %es:0x100
        movw    %cs, %es:0x102
        int     $0x40
        mov     %ds, %ax
        mov     %ax, %es
        /* Protected mode. */
        lgdtl   gdt_desc
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $PA(pm32)

func16:
        pushf
        push    %bp
        mov     %sp, %bp
        movw    $0x1234, res_call
        pop     %bp
        popf
        ret

int16:
        movw    $0xbeef, res_int16
        iret

        .code32
pm32:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     $PA(stack32_top), %esp
        push    $0x11223344
        pop     %eax
        mov     %eax, PA(res_push32)
        call    func32
        mov     $PA(int32), %eax
        mov     %ax, PA(idt) + 0x21 * 8
        shr     $16, %eax
        mov     %ax, PA(idt) + 0x21 * 8 + 6
        lidt    PA(idt_desc)
        int     $0x21
        /* Long mode: PAE, the test's page tables at 0x20000, EFER.LME, paging. */
        mov     %cr4, %eax
        or      $0x20, %eax
        mov     %eax, %cr4
        mov     $0x20000, %eax
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax
        mov     %eax, %cr0
        ljmpl   $0x18, $PA(lm64)

func32:
        movl    %esp, PA(res_esp32)
        ret

int32:
        movl    $0xcafe, PA(res_int32)
        movl    4(%esp), %eax
        movl    %eax, PA(res_int32_cs)
        iret

        .code64
lm64:
        movq    $0x6464646464, %rax
        movq    %rax, PA(res_64)
        hlt

        .balign 8
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: 32-bit code */
        .quad   0x00cf92000000ffff      /* 0x10: data */
        .quad   0x00af9a000000ffff      /* 0x18: 64-bit code */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   PA(gdt)
        .balign 8
idt:
        .fill   0x21, 8, 0
        .word   0, 0x08, 0x8e00, 0         /* 0x21: offset filled in by pm32 */
idt_end:
idt_desc:
        .word   idt_end - idt - 1
        .long   PA(idt)

data16:
        .byte   1, 2, 3, 4, 5, 6, 7, 8
copy16:
        .fill   8, 1, 0
        .balign 16
        .globl res_addr, res_call, res_loop, res_int16, res_push32, res_esp32, res_int32
        .globl res_int32_cs, res_64, copy16, stack32_top
res_addr:       .quad 0
res_call:       .quad 0
res_loop:       .quad 0
res_int16:      .quad 0
res_push32:     .quad 0
res_esp32:      .quad 0
res_int32:      .quad 0
res_int32_cs:   .quad 0
res_64:         .quad 0
        .balign 16
        .fill   256, 1, 0
stack16_top:
        .fill   256, 1, 0
stack32_top:
