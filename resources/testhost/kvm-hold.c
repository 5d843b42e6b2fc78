/*
 * kvm-hold: keeps one empty KVM VM open for the whole life of the nested test host.
 *
 * Linux 6.1 turns hardware virtualization on in every CPU (an IPI to each) when the
 * first VM is created, and off again (another IPI to each) when the last one is
 * destroyed. In the emulated test host (QEMU TCG, emulated SVM) such a call has been
 * seen to wait forever for the other CPU: a soft lockup in kvm_destroy_vm ->
 * on_each_cpu_cond_mask while a VMM exited. With this VM alive, scenario VMMs never
 * make KVM enable or disable virtualization, so they never send those IPIs.
 *
 * Usage: kvm-hold   (prints "kvm-hold: holding VM" once the VM exists, then sleeps)
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define KVM_GET_API_VERSION 0xAE00 /* _IO(KVMIO, 0x00) */
#define KVM_CREATE_VM 0xAE01       /* _IO(KVMIO, 0x01) */

int main(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        perror("kvm-hold: open /dev/kvm");
        return 1;
    }
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != 12) {
        fprintf(stderr, "kvm-hold: unexpected KVM API version\n");
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) {
        perror("kvm-hold: KVM_CREATE_VM");
        return 1;
    }
    printf("kvm-hold: holding VM\n");
    fflush(stdout);
    for (;;)
        pause();
}
