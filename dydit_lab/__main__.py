from .cli import main
from .memory import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()  # every command's steps reuse their freed buffers (see dydit_lab.memory)
    main()
