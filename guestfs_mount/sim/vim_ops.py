"""The vim25 managed objects the simulator serves, shared by the SOAP and VI/JSON front ends.

A front end parses a request into ``(method, _this, params)`` with the parameter kinds of
:data:`PARAMS`, calls :meth:`VimService.invoke` or :meth:`VimService.get_property`, and
serialises the :class:`Data` tree it gets back (or the :class:`~.vim_faults.VimFault`).
Everything else (sessions, the VM state, guest credentials, transfer URLs, faults,
counters) is the same :class:`~.state.SimState` the ``/api`` endpoints use.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from . import guestfs
from .state import SimState, Vm
from .vapi import VapiError
from .vim_data import (
    API_VERSION,
    DEFAULT_PAGE,
    AnyValue,
    Data,
    DateTime,
    PropertySpec,
    Value,
    as_any,
    attributes,
    file_info,
    wire_safe,
)
from .vim_faults import (
    POWER_STATE,
    MoRef,
    VimFault,
    from_vapi,
    invalid_argument,
    method_not_found,
    not_authenticated,
    object_not_found,
)


@dataclass(frozen=True)
class Flavor:
    """The managed-object ids of a vCenter or of a standalone ESXi host."""

    esxi: bool
    service_instance: str = "ServiceInstance"

    def moid(self, role: str) -> str:
        table = ESXI_MOIDS if self.esxi else VCENTER_MOIDS
        return table[role]


VCENTER_MOIDS = {
    "rootFolder": "group-d1",
    "propertyCollector": "propertyCollector",
    "viewManager": "ViewManager",
    "sessionManager": "SessionManager",
    "searchIndex": "SearchIndex",
    "guestOperationsManager": "guestOperationsManager",
    "fileManager": "guestOperationsFileManager",
    "authManager": "guestOperationsAuthManager",
    "datacenter": "datacenter-1",
    "datacenterName": "Datacenter",
    "vmFolder": "group-v3",
}
# ESXi hostd's ids (govmomi's recorded ESXi ServiceContent); the two guest managers'
# ids follow the same pattern [estimate].
ESXI_MOIDS = {
    "rootFolder": "ha-folder-root",
    "propertyCollector": "ha-property-collector",
    "viewManager": "ViewManager",
    "sessionManager": "ha-sessionmgr",
    "searchIndex": "ha-searchindex",
    "guestOperationsManager": "ha-guest-operations-manager",
    "fileManager": "ha-guest-operations-file-manager",
    "authManager": "ha-guest-operations-auth-manager",
    "datacenter": "ha-datacenter",
    "datacenterName": "ha-datacenter",
    "vmFolder": "ha-folder-vm",
}

# Methods that need no session (System.Anonymous).
ANONYMOUS = frozenset({"RetrieveServiceContent", "Login", "CurrentTime"})


@dataclass
class CallContext:
    """One request's transport, session token in, and session changes out."""

    transport: str  # "soap" | "vi-json"
    token: str | None
    new_token: str | None = None
    logged_out: bool = False
    client: str = ""
    user_agent: str = ""


class VimService:
    """ServiceInstance, SessionManager, SearchIndex, ViewManager, PropertyCollector and the
    guest operations managers of one simulated vCenter or ESXi host."""

    def __init__(self, state: SimState, esxi: bool = False) -> None:
        self.state = state
        self.flavor = Flavor(esxi)
        self.mo = {role: self.flavor.moid(role) for role in VCENTER_MOIDS}

    # ---- inventory ---------------------------------------------------------------
    def ref(self, role: str) -> MoRef:
        types = {
            "rootFolder": "Folder",
            "propertyCollector": "PropertyCollector",
            "viewManager": "ViewManager",
            "sessionManager": "SessionManager",
            "searchIndex": "SearchIndex",
            "guestOperationsManager": "GuestOperationsManager",
            "fileManager": "GuestFileManager",
            "authManager": "GuestAuthManager",
            "datacenter": "Datacenter",
            "vmFolder": "Folder",
        }
        return MoRef(types[role], self.mo[role])

    def about(self) -> Data:
        if self.flavor.esxi:
            name, full, os_type, line, api_type = (
                "VMware ESXi",
                "VMware ESXi 8.0.3 build-24022510 (guestfs-sim)",
                "vmnix-x86",
                "embeddedEsx",
                "HostAgent",
            )
        else:
            name, full, os_type, line, api_type = (
                "VMware vCenter Server",
                "VMware vCenter Server 8.0.3 build-24022515 (guestfs-sim)",
                "linux-x64",
                "vpx",
                "VirtualCenter",
            )
        return Data(
            "AboutInfo",
            [
                ("name", name),
                ("fullName", full),
                ("vendor", "VMware, Inc."),
                ("version", "8.0.3"),
                ("patchLevel", ""),
                ("build", "24022515"),
                ("localeVersion", "INTL"),
                ("localeBuild", "000"),
                ("osType", os_type),
                ("productLineId", line),
                ("apiType", api_type),
                ("apiVersion", API_VERSION),
                ("instanceUuid", "5f0c6a7e-1d2b-4c3a-9e8f-6a5b4c3d2e1f"),
            ],
        )

    def service_content(self) -> Data:
        # XSD order of ServiceContent: rootFolder, propertyCollector, viewManager, about,
        # setting, userDirectory, sessionManager, ..., searchIndex, ..., guestOperationsManager
        return Data(
            "ServiceContent",
            [
                ("rootFolder", self.ref("rootFolder")),
                ("propertyCollector", self.ref("propertyCollector")),
                ("viewManager", self.ref("viewManager")),
                ("about", self.about()),
                ("sessionManager", self.ref("sessionManager")),
                ("searchIndex", self.ref("searchIndex")),
                ("guestOperationsManager", self.ref("guestOperationsManager")),
            ],
        )

    def vm_of(self, ref: Any) -> Vm:
        if not isinstance(ref, MoRef) or ref.type != "VirtualMachine":
            raise invalid_argument("vm")
        vm = self.state.vms.get(ref.value)
        if vm is None:
            raise object_not_found(ref)
        return vm

    # ---- sessions ----------------------------------------------------------------
    def check_session(self, ctx: CallContext) -> str:
        try:
            sess = self.state.session(ctx.token)
        except VapiError:
            raise not_authenticated() from None
        return sess.user

    def user_session(self, token: str, ctx: CallContext) -> Data:
        sess = self.state.sessions[token]
        offset = _wall_offset(self.state)
        login = DateTime(int(sess.created + offset))
        return Data(
            "UserSession",
            [
                ("key", _session_key(token)),
                ("userName", sess.user),
                ("fullName", sess.user.split("@", 1)[0]),
                ("loginTime", login),
                ("lastActiveTime", DateTime(int(sess.last_accessed + offset))),
                ("locale", "en"),
                ("messageLocale", "en"),
                ("extensionSession", False),
                ("ipAddress", ctx.client),
                ("userAgent", ctx.user_agent),
                ("callCount", 0),
            ],
        )

    # ---- dispatch ----------------------------------------------------------------
    async def invoke(
        self, ctx: CallContext, method: str, this: MoRef, params: dict[str, Any]
    ) -> Value:
        handler = self.lookup(this, method)
        if method not in ANONYMOUS:
            self.check_session(ctx)
        return await handler(ctx, this, params)

    def lookup(self, this: MoRef, method: str) -> Any:
        """The handler of ``method`` on ``this``; ManagedObjectNotFound / MethodNotFound."""
        mo = self.mo
        table: dict[tuple[str, str, str], Any] = {
            ("ServiceInstance", self.flavor.service_instance, "RetrieveServiceContent"): (
                self._retrieve_service_content
            ),
            ("ServiceInstance", self.flavor.service_instance, "CurrentTime"): self._current_time,
            ("SessionManager", mo["sessionManager"], "Login"): self._login,
            ("SessionManager", mo["sessionManager"], "Logout"): self._logout,
            ("SearchIndex", mo["searchIndex"], "FindByInventoryPath"): self._find_by_path,
            ("ViewManager", mo["viewManager"], "CreateContainerView"): self._create_view,
            ("PropertyCollector", mo["propertyCollector"], "RetrieveProperties"): self._retrieve,
            ("PropertyCollector", mo["propertyCollector"], "RetrievePropertiesEx"): (
                self._retrieve_ex
            ),
            ("GuestFileManager", mo["fileManager"], "ListFilesInGuest"): self._list_files,
            ("GuestFileManager", mo["fileManager"], "InitiateFileTransferFromGuest"): (
                self._initiate
            ),
            ("GuestAuthManager", mo["authManager"], "ValidateCredentialsInGuest"): self._validate,
        }
        handler = table.get((this.type, this.value, method))
        if handler is not None:
            return handler
        if method == "DestroyView" and this.type == "ContainerView":
            return self._destroy_view
        if method == "Fetch":
            return self._fetch
        known = {(t, v) for t, v, _m in table}
        if (this.type, this.value) in known or this.type == "ContainerView":
            raise method_not_found(this.type, method)
        raise object_not_found(this)

    async def _retrieve_service_content(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        return self.service_content()

    async def _current_time(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        return DateTime(int(time.time()))

    async def _login(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        try:
            token = self.state.login(p["userName"], p["password"])
        except VapiError:
            raise VimFault(
                "InvalidLogin", "Cannot complete login due to an incorrect user name or password."
            ) from None
        if ctx.token:
            self.state.logout(ctx.token)
        ctx.new_token = token
        return self.user_session(token, ctx)

    async def _logout(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        assert ctx.token is not None
        self.state.logout(ctx.token)
        ctx.logged_out = True
        return None

    async def _find_by_path(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        """``{datacenter}/vm/{name}``: the one inventory path form the simulator has."""
        parts = str(p["inventoryPath"]).split("/")
        if len(parts) == 3 and parts[0] == self.mo["datacenterName"] and parts[1] == "vm":
            for vm in self.state.vms.values():
                if vm.name == parts[2]:
                    return MoRef("VirtualMachine", vm.vm)
        if parts == [self.mo["datacenterName"]]:
            return self.ref("datacenter")
        return None

    async def _create_view(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        types = p.get("type") or []
        if any(t != "VirtualMachine" for t in types) or not isinstance(p["container"], MoRef):
            raise invalid_argument("type", "The simulator's views hold VirtualMachine only.")
        return MoRef("ContainerView", "session[guestfs-sim]vm-view")

    async def _destroy_view(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        return None

    # ---- properties --------------------------------------------------------------
    def get_property(self, ref: MoRef, path: str) -> Value:
        """``path`` of ``ref`` (an AnyValue-free Python value); VimFault if unknown."""
        mo = self.mo
        if ref == self.ref("guestOperationsManager"):
            if path == "fileManager":
                return self.ref("fileManager")
            if path == "authManager":
                return self.ref("authManager")
        elif ref.type == "ServiceInstance" and ref.value == self.flavor.service_instance:
            if path == "content":
                return self.service_content()
        elif ref.type == "ContainerView":
            if path == "view":
                return [MoRef("VirtualMachine", vm.vm) for vm in self.state.vms.values()]
        elif ref.type == "VirtualMachine":
            vm = self.vm_of(ref)
            value = _vm_property(vm, path)
            if value is not None:
                return value
        elif ref == self.ref("datacenter") and path == "name":
            return mo["datacenterName"]
        elif ref == self.ref("datacenter") and path == "vmFolder":
            return self.ref("vmFolder")
        else:
            raise object_not_found(ref)
        raise VimFault(
            "InvalidProperty", f"Property {path} of {ref.type} is not served.", (("name", path),)
        )

    async def _fetch(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        return self.get_property(this, str(p["prop"]))

    async def _retrieve(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        return self._collect(p["specSet"])

    async def _retrieve_ex(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        objects = self._collect(p["specSet"])
        if not objects:
            return None
        return Data("RetrieveResult", [("objects", objects)])

    def _collect(self, specs: Sequence[PropertySpec]) -> list[Data]:
        """ObjectContent for each object of each spec. A spec whose object is a
        ContainerView or a Folder with a selectSet reaches every VM (the simulator's
        inventory is flat); other objects are read as given."""
        out: list[Data] = []
        for spec in specs:
            targets: list[MoRef] = []
            for obj, skip, traverse in spec.objects:
                if not skip:
                    targets.append(obj)
                if traverse and obj.type in ("ContainerView", "Folder"):
                    targets.extend(MoRef("VirtualMachine", v.vm) for v in self.state.vms.values())
            for target in targets:
                paths = [ps for t, ps in spec.props if t == target.type]
                if not paths:
                    continue
                props = []
                for path in sorted({p for ps in paths for p in ps}):
                    value = self.get_property(target, path)
                    props.append(Data("DynamicProperty", [("name", path), ("val", as_any(value))]))
                out.append(Data("ObjectContent", [("obj", target), ("propSet", props)]))
        return out

    # ---- guest operations --------------------------------------------------------
    def _ready(self, p: dict[str, Any]) -> tuple[Vm, dict[str, Any]]:
        """Host-side checks of a guest call (no lane): VM, power, Tools, injected faults."""
        vm = self.vm_of(p["vm"])
        try:
            self.state.guest_ready(vm)
        except VapiError as err:
            raise from_vapi(err, vm.vm) from err
        return vm, _rest_credentials(p["auth"])

    async def _validate(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        vm, creds = self._ready(p)
        try:
            async with self.state.cost.guest_op(vm, "credentials.validate", ctx.transport):
                self.state.guest_login(creds)
        except VapiError as err:
            raise from_vapi(err, vm.vm) from err
        return None

    async def _list_files(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        index = p.get("index")
        size = p.get("maxResults")
        index = 0 if index is None else index
        size = DEFAULT_PAGE if size is None else size
        if index < 0:
            raise invalid_argument("index")
        if size < 0:
            raise invalid_argument("maxResults")
        size = min(size or DEFAULT_PAGE, self.state.options.max_page_size)
        vm, creds = self._ready(p)
        xml = ctx.transport == "soap"
        try:
            regex = guestfs.compile_pattern(p.get("matchPattern"))
            async with self.state.cost.guest_op(vm, "files.list", ctx.transport) as op:
                account = self.state.guest_login(creds)
                entries = await trio.to_thread.run_sync(
                    self.state.scan_dir, vm, account, p["filePath"]
                )
                scanned = len(entries)
                entries = [
                    e
                    for e in entries
                    if wire_safe(e, xml) and (regex is None or regex.search(e.name))
                ]
                page = entries[index : index + size]
                op.listed(scanned=scanned, returned=len(page))
        except VapiError as err:
            raise from_vapi(err, vm.vm) from err
        remaining = max(0, len(entries) - index - len(page))
        return Data(
            "GuestListFileInfo", [("files", [file_info(e) for e in page]), ("remaining", remaining)]
        )

    async def _initiate(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        vm, creds = self._ready(p)
        try:
            async with self.state.cost.guest_op(vm, "transfer.create", ctx.transport):
                account = self.state.guest_login(creds)
                url, e = self.state.create_transfer_info(vm, account, p["guestFilePath"])
        except VapiError as err:
            raise from_vapi(err, vm.vm, "guestFilePath") from err
        return Data(
            "FileTransferInformation",
            [("attributes", attributes(e)), ("size", e.size), ("url", url)],
        )


def _vm_property(vm: Vm, path: str) -> Value:
    running = vm.tools_running and vm.power_state == "POWERED_ON"
    power = AnyValue("VirtualMachinePowerState", POWER_STATE[vm.power_state])
    tools = "guestToolsRunning" if running else "guestToolsNotRunning"
    family = "windowsGuest" if vm.family == "WINDOWS" else "linuxGuest"
    simple: dict[str, Value] = {
        "name": vm.name,
        "config.instanceUuid": vm.instance_uuid,
        "runtime.powerState": power,
        "runtime.connectionState": AnyValue("VirtualMachineConnectionState", "connected"),
        "guest.toolsRunningStatus": tools,
        "guest.guestOperationsReady": running,
        "guest.interactiveGuestOperationsReady": False,
        "guest.guestFamily": family,
    }
    if path in simple:
        return simple[path]
    if path == "runtime":
        return Data(
            "VirtualMachineRuntimeInfo",
            [("connectionState", "connected"), ("powerState", power.value)],
        )
    if path == "guest":
        return Data(
            "GuestInfo",
            [
                ("toolsRunningStatus", tools),
                ("toolsVersion", "12389"),
                ("guestFamily", family),
                ("guestOperationsReady", running),
                ("interactiveGuestOperationsReady", False),
            ],
        )
    return None


def _rest_credentials(auth: Any) -> dict[str, Any]:
    """A vim25 GuestAuthentication as the state's REST ``Credentials`` object."""
    if not isinstance(auth, dict):
        raise invalid_argument("auth")
    inter = auth.get("interactiveSession")
    kind = auth.get("_typeName")
    if kind == "NamePasswordAuthentication":
        return {
            "interactive_session": inter,
            "type": "USERNAME_PASSWORD",
            "user_name": auth.get("username"),
            "password": auth.get("password"),
        }
    if kind == "SAMLTokenAuthentication":
        return {
            "interactive_session": inter,
            "type": "SAML_BEARER_TOKEN",
            "user_name": auth.get("username"),
            "saml_token": auth.get("token"),
        }
    raise invalid_argument("auth", f"Unsupported guest authentication type {kind!r}.")


def _session_key(token: str) -> str:
    # UserSession.key is the session's id, not the secret cookie value
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _wall_offset(state: SimState) -> float:
    return time.time() - state.clock()
