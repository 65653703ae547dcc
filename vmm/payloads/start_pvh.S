/*
 * PVH entry of the rqemu test payload (linked only into payload-pvh.elf).
 *
 * The XEN_ELFNOTE_PHYS32_ENTRY note makes the VMM use the PVH boot protocol: 32-bit
 * protected mode, paging off, EBX = hvm_start_info. This stub builds its own identity map
 * of the first 4 GiB (2 MiB pages), enters long mode and calls payload_main(info, 1).
 */
    .section .note.pvh, "a"
    .align 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .section .text, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov     %ebx, %esi
    /* 4 page directories: entry i maps i * 2 MiB. */
    mov     $pvh_pd, %edi
    xor     %ecx, %ecx
1:  mov     %ecx, %eax
    shl     $21, %eax
    or      $0x83, %eax
    mov     %eax, (%edi,%ecx,8)
    mov     %ecx, %eax
    shr     $11, %eax
    mov     %eax, 4(%edi,%ecx,8)
    inc     %ecx
    cmp     $2048, %ecx
    jb      1b
    mov     $pvh_pdpt, %edi
    mov     $pvh_pd + 3, %eax
    mov     %eax, 0(%edi)
    add     $4096, %eax
    mov     %eax, 8(%edi)
    add     $4096, %eax
    mov     %eax, 16(%edi)
    add     $4096, %eax
    mov     %eax, 24(%edi)
    mov     $pvh_pml4, %edi
    movl    $pvh_pdpt + 3, (%edi)
    mov     %edi, %cr3
    mov     %cr4, %eax
    or      $0x20, %eax             /* PAE */
    mov     %eax, %cr4
    mov     $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or      $0x100, %eax
    wrmsr
    mov     %cr0, %eax
    or      $0x80000001, %eax       /* PG | PE */
    mov     %eax, %cr0
    lgdt    pvh_gdt_desc
    ljmp    $0x08, $pvh_long

    .code64
pvh_long:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    lea     stack_top(%rip), %rsp
    mov     %esi, %edi              /* hvm_start_info (zero-extended) */
    mov     $1, %esi                /* PVH */
    call    payload_main
2:  hlt
    jmp     2b

    .section .rodata
    .align 8
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
pvh_gdt_desc:
    .word 23
    .long pvh_gdt

    .section .bss
    .align 4096
pvh_pml4:
    .skip 4096
pvh_pdpt:
    .skip 4096
pvh_pd:
    .skip 16384
